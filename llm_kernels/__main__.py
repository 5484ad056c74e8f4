import sys

from llm_kernels.cli import main

sys.exit(main())
