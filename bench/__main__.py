"""``python -m llm_kernels.bench``: the same as ``llm-kernels bench``."""
import sys

from llm_kernels.bench.cli import main

sys.exit(main())
