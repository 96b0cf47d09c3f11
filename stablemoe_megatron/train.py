"""``stablemoe-train`` / ``python -m stablemoe_megatron.train``: pretraining, launched by torchrun.

    torchrun --nproc-per-node 2 -m stablemoe_megatron.train --num-layers 4 ... --data-path PREFIX

User errors (bad flags, missing files, incompatible checkpoints) print one line and exit with 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from stablemoe_megatron.errors import ConfigError, TrainingStopped


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse the flags and train; raises ConfigError / TrainingStopped."""
    from stablemoe_megatron.cli_args import dump_config, parse_config
    from stablemoe_megatron.parallel import quiet_megatron_warnings

    quiet_megatron_warnings()
    config = parse_config(argv)
    from stablemoe_megatron.training.loop import pretrain

    if config.checkpoint.save and _rank() == 0:
        Path(config.checkpoint.save).mkdir(parents=True, exist_ok=True)
        (Path(config.checkpoint.save) / "run_config.yaml").write_text(dump_config(config))
    return pretrain(config)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _first_rank() -> bool:
    """User errors are the same on every rank: print them once."""
    return _rank() == 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv)
    except ConfigError as exc:
        if _first_rank():
            print(f"stablemoe-train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as exc:
        print(f"stablemoe-train: stopped: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    try:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


if __name__ == "__main__":
    sys.exit(main())
