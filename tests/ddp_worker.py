"""One process of a multi-process training run, for tests/test_train.py.

Usage (with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set as torchrun sets them):
    python tests/ddp_worker.py DUMP_DIR train --data FILE ...
Trains like `llm-kernels train`, then saves this rank's final parameters and per-step losses
to DUMP_DIR/rank{RANK}.pt so that the test can compare the ranks.
"""
import os
import sys

import torch

from llm_kernels import train


def main() -> None:
    torch.set_num_threads(1)
    dump_dir, argv = sys.argv[1], sys.argv[2:]
    result = train.train(train.build_parser().parse_args(argv))
    state = {"params": result.model.state_dict(), "losses": result.history["train"]}
    torch.save(state, os.path.join(dump_dir, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main()
