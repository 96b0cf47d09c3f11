"""Process-level plumbing shared by the trainer, the tools and the test harness.

* Rank helpers: which rank this process is and how many there are, from torch.distributed once a
  process group exists and from torchrun's ``RANK`` / ``WORLD_SIZE`` before (so code that runs
  before ``init_process_group``, e.g. the checks of a launch, already knows whether it is rank 0).
  They never import torch themselves: with no torch imported there is no process group either.
* :func:`free_port`: a TCP port on 127.0.0.1 nobody listens on (a rendezvous port for local groups).
* :class:`GlooPool` / :func:`run_world`: ``world`` local processes (``multiprocessing`` spawn)
  joined in one process group on 127.0.0.1, running picklable jobs. The test harness keeps pools
  alive between calls (starting a process that imports torch and megatron-core costs seconds);
  ``convert_checkpoint import`` / ``reshard`` start one for a single job (:func:`run_world`).

A worker's failure comes back as one exception: a :class:`~stablemoe_megatron.errors.ConfigError`
as a ConfigError with its message (when the pool is asked to, so a tool's user sees one line),
anything else as ``error`` (RuntimeError by default) carrying the worker's traceback. A dead worker
or a missed deadline (a hung collective) raises too; the caller then closes the pool, which kills
the workers and every process they started, so no rank waiting in a collective is left behind.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

from stablemoe_megatron.errors import ConfigError


# -- ranks -----------------------------------------------------------------------------------------
def _process_group_active() -> bool:
    torch = sys.modules.get("torch")  # not imported -> no process group can exist
    return bool(torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized())


def global_rank() -> int:
    """This process's global rank: torch.distributed's, else torchrun's ``RANK`` (0 when unset)."""
    if _process_group_active():
        import torch

        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_first_rank() -> bool:
    """True on global rank 0 (the rank that prints, writes shared files and holds locks)."""
    return global_rank() == 0


def is_last_rank() -> bool:
    """True on the last global rank (the one that logs: it holds the last pipeline stage's loss);
    True in a single process without a process group."""
    if not _process_group_active():
        return True
    import torch

    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def world_size_from_env() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """torch.distributed's world size once a process group exists, else :func:`world_size_from_env`."""
    if _process_group_active():
        import torch

        return torch.distributed.get_world_size()
    return world_size_from_env()


def barrier() -> None:
    """torch.distributed barrier when a process group exists (a no-op in a single process)."""
    if _process_group_active():
        import torch

        torch.distributed.barrier()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- worker processes ------------------------------------------------------------------------------
def _failure(exc: BaseException) -> Tuple[Optional[str], str]:
    """(ConfigError message or None, traceback) of the exception being handled."""
    return (str(exc) if isinstance(exc, ConfigError) else None), traceback.format_exc()


def _init_default_group(rank: int, world_size: int) -> None:
    import torch

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


def _worker_main(rank: int, world: int, port: int, env: Dict[str, str], threads: int,
                 setup: Optional[Callable], jobs, results) -> None:
    """Worker process: join the world once, then run ``(fn, args, kwargs)`` jobs until None arrives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **env)
    try:
        import torch

        torch.set_num_threads(threads)
        (setup or _init_default_group)(rank=rank, world_size=world)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, _failure(exc)))
        return
    results.put((rank, True, "ready"))
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
            results.put((rank, False, _failure(exc)))


def stop_processes(procs) -> None:
    """Kill the still-running ``procs`` and every process they started (megatron's checkpoint
    writers start a multiprocessing manager, which would outlive a killed parent), then join them."""
    import psutil

    for proc in procs:
        if proc.is_alive():
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            proc.kill()
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
        proc.join(timeout=30)


class GlooPool:
    """``world_size`` spawned worker processes joined in one process group on 127.0.0.1.

    Args:
        setup: picklable ``setup(rank=, world_size=)`` run once in each worker to create the default
            process group (e.g. a partial of :func:`stablemoe_megatron.parallel.initialize_distributed`);
            default: a plain gloo group.
        threads: torch intra-op threads per worker.
        env: extra environment variables of the workers (set before torch is imported).
        start_timeout: seconds to wait for every worker to join.
        error: exception class raised for a failed, dead or timed-out worker.
        config_errors: re-raise a worker's ConfigError as a ConfigError with its message (otherwise
            it is a failure like any other, with its traceback).
    """

    def __init__(self, world_size: int, setup: Optional[Callable] = None, *, threads: int = 1,
                 env: Optional[Mapping[str, str]] = None, start_timeout: float = 120.0,
                 error: Type[BaseException] = RuntimeError, config_errors: bool = True):
        ctx = mp.get_context("spawn")
        self.world_size, self.error, self.config_errors = world_size, error, config_errors
        self.results = ctx.Queue()
        self.job_queues = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker_main,
                        args=(rank, world_size, port, dict(env or {}), threads, setup,
                              self.job_queues[rank], self.results),
                        daemon=False)  # dist_checkpointing starts child processes of its own
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()
        try:
            self._collect(start_timeout, what="start-up")
        except BaseException:
            self.close(graceful=False)
            raise

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def run(self, fn: Callable, args: tuple = (), kwargs: Optional[dict] = None, timeout: float = 300.0,
            what: Optional[str] = None) -> List[Any]:
        """``fn(*args, **kwargs)`` on every rank; the per-rank return values. ``fn`` must be
        importable by module and name (the workers unpickle it). After an exception the pool's
        queues may hold stale results: close it."""
        for jobs in self.job_queues:
            jobs.put((fn, tuple(args), dict(kwargs or {})))
        return self._collect(timeout, what=what or getattr(fn, "__name__", str(fn)))

    def _collect(self, timeout: float, what: str) -> List[Any]:
        """Wait for one result per rank; raise on the first failure, a dead worker or the deadline."""
        deadline = time.monotonic() + timeout
        values: Dict[int, Any] = {}
        while len(values) < self.world_size:
            try:
                rank, ok, value = self.results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    raise self.error(f"{what}: worker rank(s) {dead} died (exit codes "
                                     f"{[self.procs[r].exitcode for r in dead]}; out of memory?)") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(values))
                    raise self.error(f"{what}: timed out after {timeout:.0f}s waiting for rank(s) {missing} "
                                     f"(a hung collective?)") from None
                continue
            if not ok:
                config_message, trace = value
                if self.config_errors and config_message is not None:
                    raise ConfigError(config_message)
                raise self.error(f"{what}: rank {rank} of {self.world_size} failed:\n{trace}")
            values[rank] = value
        return [values[rank] for rank in range(self.world_size)]

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: ask them to exit (graceful) or kill them (after a failure or hang)."""
        for jobs, proc in zip(self.job_queues, self.procs):
            if graceful and proc.is_alive():
                try:
                    jobs.put(None)
                except Exception:  # noqa: BLE001 - the kill below follows anyway
                    pass
        for proc in self.procs:
            if graceful:
                proc.join(timeout=5)
        stop_processes(self.procs)  # what is left, with its children


def run_world(fn: Callable, world: int, setup: Optional[Callable] = None, args: tuple = (),
              timeout: float = 24 * 3600.0, what: Optional[str] = None) -> List[Any]:
    """Run ``fn(*args)`` once on ``world`` fresh CPU ranks; the per-rank results.

    The workers see no GPU (``CUDA_VISIBLE_DEVICES`` is emptied) and share the cores. A worker's
    ConfigError is raised as a ConfigError; any other failure as a RuntimeError with its traceback.
    """
    pool = GlooPool(world, setup, threads=max(1, (os.cpu_count() or 1) // world),
                    env={"CUDA_VISIBLE_DEVICES": ""}, start_timeout=timeout)
    try:
        return pool.run(fn, args, timeout=timeout, what=what)
    finally:
        pool.close(graceful=False)
