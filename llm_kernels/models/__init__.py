"""The reference transformer built on the llm_kernels ops."""
from llm_kernels.models.gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
