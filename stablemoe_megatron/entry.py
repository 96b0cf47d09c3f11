"""Shared behaviour of the command-line entry points (train, eval, tools under torchrun).

User errors (:class:`ConfigError`) are the same on every rank: rank 0 prints ONE line and the
process exits with 2, without a traceback. A deliberate stop (:class:`TrainingStopped`, e.g. a
NaN loss, already explained in the log) exits with 1. The default process group is destroyed on
the way out so torchrun sees a clean exit.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from stablemoe_megatron.errors import ConfigError, TrainingStopped
from stablemoe_megatron.runtime import is_first_rank


def shutdown() -> None:
    """Destroy the default process group if one exists (best effort at exit)."""
    try:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def run_entry_point(prog: str, run: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Call ``run(argv)`` and translate the project's exceptions into exit codes."""
    try:
        run(argv)
    except ConfigError as exc:
        if is_first_rank():
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as exc:
        print(f"{prog}: stopped: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown()
    return 0
