"""What is on disk in a checkpoint run directory, checked before any work: complete checkpoints, damage.

A checkpoint ``iter_XXXXXXX/`` is *complete* when it holds ``train_state.json`` (written last, by
rank 0, just before the ``.tmp`` directory is renamed into place) and torch_dist's ``.metadata``.
The tracker file normally names the newest one; when it is missing (deleted, or lost in a copy)
:func:`resolve_load_dir` recovers the newest complete checkpoint instead of starting from scratch.

:func:`verify_files` reads torch_dist's ``.metadata`` (which records, for every tensor, the file,
offset and length it was written to) and compares each ``.distcp`` file's size with the end of
the last record in it: a truncated or missing file is named before the model is even built.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

from stablemoe_megatron.checkpoint.format import (
    DCP_METADATA,
    MEGATRON_METADATA,
    STATE_FILE,
    TRACKER,
    iteration_dir,
    read_tracker,
)
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.runtime import is_first_rank

_ITER_DIR = re.compile(r"iter_(\d{7})")


def is_complete(directory) -> bool:
    directory = Path(directory)
    return (directory / STATE_FILE).is_file() and (directory / DCP_METADATA).is_file()


def complete_iterations(root) -> List[int]:
    """Iterations of the complete ``iter_*`` checkpoints directly under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _ITER_DIR.fullmatch(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append(int(match.group(1)))
    return sorted(found)


def any_checkpoint_files(root) -> List[str]:
    """Names of ``iter_*`` entries (complete or not, ``.tmp`` excluded) and the tracker under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if (_ITER_DIR.fullmatch(p.name) and p.is_dir()) or p.name == TRACKER)


def newest_complete(root) -> Optional[int]:
    found = complete_iterations(root)
    return found[-1] if found else None


def describe_iterations(iterations: List[int], limit: int = 4) -> str:
    """``iter_0000005, iter_0000010, ... (7 checkpoints)`` for messages."""
    names = [f"iter_{i:07d}" for i in iterations]
    if len(names) > limit:
        return f"{', '.join(names[:2])}, ..., {', '.join(names[-2:])} ({len(names)} checkpoints)"
    return ", ".join(names)


def previous_hint(directory) -> str:
    """How to resume from the checkpoint before ``directory`` (for a damaged newest one)."""
    directory = Path(directory)
    older = [i for i in complete_iterations(directory.parent)
             if iteration_dir(directory.parent, i) != directory and f"iter_{i:07d}" < directory.name]
    if not older:
        return "no earlier complete checkpoint exists in " + str(directory.parent)
    return (f"to resume from the previous checkpoint, pass --load {iteration_dir(directory.parent, older[-1])} "
            f"(or move {directory.name} out of {directory.parent})")


def verify_files(directory) -> None:
    """ConfigError naming the file when a checkpoint's metadata or data files are missing or truncated."""
    directory = Path(directory)
    for name in (MEGATRON_METADATA, DCP_METADATA):
        if not (directory / name).is_file():
            raise ConfigError(f"checkpoint {directory} is damaged: {directory / name} is missing; "
                              f"{previous_hint(directory)}")
    expected = _expected_sizes(directory)
    for relative, size in sorted(expected.items()):
        path = directory / relative
        actual = path.stat().st_size if path.is_file() else None
        if actual is None or actual < size:
            what = "is missing" if actual is None else f"is truncated ({actual} bytes, its index needs {size})"
            raise ConfigError(f"checkpoint {directory} is damaged: {path} {what}; {previous_hint(directory)}")


def _expected_sizes(directory: Path) -> dict:
    """{relative file name: bytes its records need} from torch_dist's ``.metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - an unreadable index is damage, whatever the exception
        raise ConfigError(f"checkpoint {directory} is damaged: {directory / DCP_METADATA} cannot be read "
                          f"({type(exc).__name__}: {exc}); {previous_hint(directory)}") from None
    sizes: dict = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), end)
    return sizes


def resolve_load_dir(load, announce: bool = True) -> Path:
    """``--load`` may name the run directory (tracker inside) or one ``iter_*`` directory.

    Without a tracker (deleted, or lost in a copy) the newest complete ``iter_*`` is used and said
    so (by the first rank). The chosen directory's files are checked against its index
    (:func:`verify_files`).
    """
    path = Path(load)
    if (path / STATE_FILE).is_file():
        verify_files(path)
        return path
    iteration = read_tracker(path)
    if iteration is None:
        found = complete_iterations(path)
        if not found:
            raise ConfigError(f"--load {load}: no {TRACKER} and no complete iter_* checkpoint there; point "
                              f"--load at the --save directory of a run or at one of its iter_* directories")
        iteration = found[-1]
        if announce and is_first_rank():
            print(f"--load {load}: {TRACKER} is missing; resuming from the newest complete checkpoint "
                  f"iter_{iteration:07d} (found {describe_iterations(found)})", flush=True)
    directory = iteration_dir(path, iteration)
    if not (directory / STATE_FILE).is_file():
        raise ConfigError(f"--load {load}: {TRACKER} names iteration {iteration} but {directory} is incomplete; "
                          f"{previous_hint(directory)}")
    verify_files(directory)
    return directory
