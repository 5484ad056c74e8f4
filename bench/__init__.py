"""Microbenchmarks: one shared harness, one module per op (installed as llm_kernels.bench)."""
