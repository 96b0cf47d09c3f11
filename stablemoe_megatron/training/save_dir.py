"""One owner per ``--save`` directory, and no silent fresh start over existing checkpoints.

Ownership. Rank 0 holds an exclusive ``flock`` on ``SAVE/run.lock`` for the whole run and writes
its holder into the file (host, pid, Slurm job id, start time, command). The kernel drops the lock
when the holder dies, however it dies (kill -9, out-of-memory, a lost node's NFS lease expiring),
so a crashed run never leaves a stale lock behind; the file's text then only names the last
holder. ``flock`` works across hosts on NFS (Linux maps it to NFS byte-range locks) and on Lustre
or GPFS when mounted with locking (Lustre: ``-o flock``). A filesystem without locking gets a
warning, not a refusal, since refusing would make the directory unusable.

Existing work. :func:`check_existing_work` runs on every rank before anything is written: a
``--save`` directory that already holds checkpoints (or a tracker) is only written into by a run
that resumes from it (``--load`` the same directory or one of its ``iter_*``). Anything else stops
with a message naming what was found, unless ``--start-fresh`` is given; then rank 0 moves the old
checkpoints into ``SAVE/superseded_<UTC time>/`` (nothing is deleted) before training starts.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from stablemoe_megatron.checkpoint import any_checkpoint_files, complete_iterations
from stablemoe_megatron.errors import ConfigError

LOCK_FILE = "run.lock"
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def resumes_from(save, load) -> bool:
    """True when ``--load`` is the ``--save`` directory or one of its ``iter_*`` directories."""
    if not load:
        return False
    save, load = Path(save).resolve(), Path(load).resolve()
    return load == save or load.parent == save


def check_existing_work(save, load, start_fresh: bool) -> None:
    """ConfigError when this run would write over another run's checkpoints in ``save``."""
    found = any_checkpoint_files(save)
    if not found or start_fresh or resumes_from(save, load):
        return
    complete = complete_iterations(save)
    what = (f"{len(complete)} complete checkpoint(s), newest iter_{complete[-1]:07d}" if complete
            else f"checkpoint files ({', '.join(found[:3])})")
    source = f"this run loads --load {load}" if load else "this run does not resume from it (no --load)"
    raise ConfigError(f"--save {save} already holds {what}, but {source}: to continue that run pass "
                      f"--load {save}; to start over there, add --start-fresh (the old checkpoints are "
                      f"moved to {save}/superseded_<time>/, nothing is deleted); or choose another --save")


def supersede_existing_work(save) -> Optional[Path]:
    """Move every ``iter_*`` and the tracker under ``save`` into ``save/superseded_<UTC time>/``."""
    names = any_checkpoint_files(save)
    if not names:
        return None
    target = Path(save) / time.strftime("superseded_%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir()
    for name in names:
        os.replace(Path(save) / name, target / name)
    return target


class SaveDirLock:
    """An exclusive lock on ``SAVE/run.lock``, held until :meth:`release` or the process's death."""

    def __init__(self, path: Path, handle):
        self.path, self._handle = path, handle

    @classmethod
    def acquire(cls, save) -> "SaveDirLock":
        """Take the lock or raise ConfigError naming the holder (never waits)."""
        import fcntl

        path = Path(save) / LOCK_FILE
        try:
            Path(save).mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--save {save}: cannot create {path} ({exc.strerror or exc}): choose a "
                              f"writable --save directory") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path)
            handle.close()
            raise ConfigError(f"--save {save} is in use by another run ({holder}; lock {path}): wait for it "
                              f"to finish or stop it, or choose another --save") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKING:
                handle.close()
                raise
            print(f"warning: {path}: the filesystem does not support file locks; nothing stops a second "
                  f"run from writing into --save {save}", file=sys.stderr, flush=True)
        _write_holder(handle)
        return cls(path, handle)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)}


def _write_holder(handle) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(_holder_record()) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _read_holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "holder unknown"
    job = f", Slurm job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job}, started {record.get('started')}"


def claim(config, dumped_config: str, first_rank: bool) -> Optional[SaveDirLock]:
    """Rank 0, after every check passed: lock ``--save``, move old work aside if asked, write run_config.yaml."""
    save = config.checkpoint.save
    if not save or not first_rank:
        return None
    lock = SaveDirLock.acquire(save)
    try:
        check_existing_work(save, config.checkpoint.load, config.checkpoint.start_fresh)
        if config.checkpoint.start_fresh:
            moved = supersede_existing_work(save)
            if moved is not None:
                print(f"--start-fresh: moved the existing checkpoints of {save} to {moved}", flush=True)
        _write_atomically(Path(save) / "run_config.yaml", dumped_config)
    except BaseException:
        lock.release()
        raise
    return lock


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
