"""Triton kernels, one module per op: launchers named after the ops of llm_kernels._ops."""
