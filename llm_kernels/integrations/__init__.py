"""Integrations with other libraries; each imports its library only when used.

- ``llm_kernels.integrations.transformers.register()``: the ``"llm_kernels"`` attention
  implementation for Hugging Face transformers (``pip install llm-kernels[hf]``).
"""
