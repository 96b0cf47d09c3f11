"""``stablemoe-train`` / ``python -m stablemoe_megatron.train``: pretraining, launched by torchrun.

    torchrun --nproc-per-node 2 -m stablemoe_megatron.train --num-layers 4 ... --data-path PREFIX

User errors (bad flags, missing files, incompatible checkpoints) print one line and exit with 2.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from stablemoe_megatron.entry import run_entry_point


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the flags and train; raises ConfigError / TrainingStopped."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.parallel import quiet_megatron_warnings

    quiet_megatron_warnings()
    config = parse_config(argv)
    from stablemoe_megatron.training.loop import pretrain

    return pretrain(config)  # writes SAVE/run_config.yaml only after every check passed


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point("stablemoe-train", run, argv)


if __name__ == "__main__":
    sys.exit(main())
