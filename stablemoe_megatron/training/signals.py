"""Stopping cleanly: SIGUSR1 / SIGTERM save a checkpoint and exit; workers never outlive torchrun.

:class:`StopSignals` turns SIGUSR1 (Slurm's ``--signal=USR1@T``) and SIGTERM (what Slurm sends at
the time limit or on ``scancel``, and what torchrun forwards to its workers when it is itself
terminated) into a flag. The loop reads it once per iteration and combines it over all ranks (one
all-reduce with the NaN check), so every rank saves the same iteration and stops together.
SIGTERM leaves little time: Slurm and torchrun both send SIGKILL about 30 s later, so large models
should rely on ``--signal=USR1@120`` (the sbatch scripts do) and treat SIGTERM as the last chance.

:class:`LauncherWatch` handles the launcher's death. torchrun starts each worker in its own
session, so a ``kill -9`` of torchrun (an out-of-memory kill, a lost login shell) would leave the
workers training and writing checkpoints with nobody watching. Under torchrun a daemon thread
polls the parent pid once a second; when the worker has been re-parented it sends itself SIGTERM
(save, then exit) and, if the process is still alive ``grace_s`` later (a collective that can no
longer complete), ends it with exit code 1.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Optional

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGTERM") if hasattr(signal, name))
LAUNCHER_GRACE_S = 600.0


class StopSignals:
    """Flag set by SIGUSR1 / SIGTERM; :meth:`restore` puts the previous handlers back."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: Dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002 - signal API
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class LauncherWatch:
    """Under torchrun: SIGTERM to this worker when its launcher dies, a hard exit ``grace_s`` later."""

    def __init__(self, grace_s: float = LAUNCHER_GRACE_S, poll_s: float = 1.0):
        self.parent = os.getppid()
        self.grace_s, self.poll_s = grace_s, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)

    @classmethod
    def start_if_launched(cls) -> Optional["LauncherWatch"]:
        """Start watching when this process is a torchrun worker (TORCHELASTIC_RUN_ID is set)."""
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return None
        watch = cls()
        watch._thread.start()
        return watch

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if os.getppid() != self.parent:
                print(f"the launcher (pid {self.parent}) is gone: saving and exiting", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                if not self._stop.wait(self.grace_s):
                    print(f"still running {self.grace_s:.0f} s after the launcher died: exiting", flush=True)
                    os._exit(1)
                return

    def stop(self) -> None:
        self._stop.set()

