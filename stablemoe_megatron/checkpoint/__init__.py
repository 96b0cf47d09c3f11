"""The checkpoint format, shared by the trainer (:mod:`stablemoe_megatron.training.checkpointing`)
and the conversion tools (:mod:`stablemoe_megatron.export`), neither of which imports the other.

* :mod:`.format`  file names, :class:`TrainState`, the tracker, atomic publishing of an iteration
* :mod:`.files`   what is on disk: complete iterations, damaged files, which directory ``--load`` means

Importing this package imports neither torch nor megatron-core.
"""
from stablemoe_megatron.checkpoint.files import (
    any_checkpoint_files,
    complete_iterations,
    describe_iterations,
    is_complete,
    newest_complete,
    previous_hint,
    resolve_load_dir,
    verify_files,
)
from stablemoe_megatron.checkpoint.format import (
    CONFIG_FILE,
    DCP_METADATA,
    MEGATRON_METADATA,
    STATE_FILE,
    TRACKER,
    TrainState,
    iteration_dir,
    prune_iterations,
    publish_dir,
    read_tracker,
    read_train_state,
    staging_dir,
    train_state_text,
    write_iteration,
    write_tracker,
)

__all__ = [
    "CONFIG_FILE", "DCP_METADATA", "MEGATRON_METADATA", "STATE_FILE", "TRACKER", "TrainState",
    "any_checkpoint_files", "complete_iterations", "describe_iterations", "is_complete", "iteration_dir",
    "newest_complete", "previous_hint", "prune_iterations", "publish_dir", "read_tracker", "read_train_state",
    "resolve_load_dir", "staging_dir", "train_state_text", "verify_files", "write_iteration", "write_tracker",
]
