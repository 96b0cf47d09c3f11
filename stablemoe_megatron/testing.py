"""Run a function on N gloo ranks with megatron-core's parallel_state set up: the multi-rank test helper.

    results = run_distributed(fn, world_size=2, tp=2, args=(x,))   # one return value per rank

``fn`` must be importable by module and name (a module-level function in a test file). Each rank
runs ``fn(*args, **kwargs)`` after ``initialize_model_parallel(tp, pp, ep)`` and
``seed_everything(seed)``; parallel_state is destroyed afterwards. If any rank raises, the call
raises :class:`DistributedTestError` carrying that rank's traceback. If the ranks do not all finish
within ``timeout`` seconds (a hung collective), the workers are killed and the call raises.

Starting a process that imports torch and megatron-core costs ~6 s of CPU, so worker processes
are kept alive between calls, one pool per world size, with the default process group created
once; each call only rebuilds parallel_state. A failed or timed-out call discards its pool, so
the next call starts clean. Pools are shut down at interpreter exit.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple


class DistributedTestError(AssertionError):
    """A rank failed or the ranks timed out; the message carries the rank's traceback."""


@dataclass
class _Job:
    fn: Callable
    args: Tuple
    kwargs: Dict[str, Any]
    tp: int
    pp: int
    ep: int
    seed: int
    sys_path: List[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, jobs, results, threads: int) -> None:
    """Worker process: join the gloo world once, then run jobs until told to stop (None)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        import torch

        torch.set_num_threads(threads)
        from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed

        initialize_distributed(ParallelSizes(), rank=rank, world_size=world_size, timeout_minutes=5)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        job = jobs.get()
        if job is None:
            break
        results.put((rank, *_run_job(job)))


def _run_job(job: _Job) -> Tuple[bool, Any]:
    from stablemoe_megatron.parallel import (
        ParallelSizes,
        destroy_parallel_state,
        initialize_parallel_state,
        seed_everything,
    )

    for path in job.sys_path:
        if path not in sys.path:
            sys.path.append(path)
    try:
        initialize_parallel_state(ParallelSizes(job.tp, job.pp, job.ep), timeout_minutes=5)
        seed_everything(job.seed)
        _reset_megatron_globals()
        return True, job.fn(*job.args, **job.kwargs)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        return False, traceback.format_exc()
    finally:
        try:
            destroy_parallel_state()
        except Exception:  # noqa: BLE001 - the job's own error matters more
            pass


def _reset_megatron_globals() -> None:
    """Process-wide megatron state a previous job may have left behind in a reused worker."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # set by the pipeline schedules


class _Pool:
    """``world_size`` persistent worker processes joined in one gloo world."""

    def __init__(self, world_size: int, start_timeout: float):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.job_queues = [ctx.Queue() for _ in range(world_size)]
        port = _free_port()
        threads = 1  # identical float reduction order in every pool: comparisons across world sizes
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(rank, world_size, port, self.job_queues[rank], self.results, threads),
                daemon=False,  # dist_checkpointing starts child processes of its own
            )
            for rank in range(world_size)
        ]
        for proc in self.procs:
            proc.start()
        self._collect(start_timeout, what="start-up")

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def run(self, job: _Job, timeout: float) -> List[Any]:
        for jobs in self.job_queues:
            jobs.put(job)
        return self._collect(timeout, what=getattr(job.fn, "__name__", str(job.fn)))

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
                    raise DistributedTestError(f"{what}: worker rank(s) {dead} died (exit codes "
                                               f"{[self.procs[r].exitcode for r in dead]})")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(values))
                    raise DistributedTestError(
                        f"{what}: timed out after {timeout:.0f}s waiting for rank(s) {missing} "
                        f"(a hung collective?)")
                continue
            if not ok:
                raise DistributedTestError(f"{what}: rank {rank} of {self.world_size} failed:\n{value}")
            values[rank] = value
        return [values[rank] for rank in range(self.world_size)]

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: ask them to exit (graceful) or kill them (after a failure or hang)."""
        from stablemoe_megatron.export.world import stop_processes

        for jobs, proc in zip(self.job_queues, self.procs):
            if graceful and proc.is_alive():
                try:
                    jobs.put(None)
                except Exception:  # noqa: BLE001
                    pass
        for proc in self.procs:
            if graceful:
                proc.join(timeout=5)
        stop_processes(self.procs)  # what is left, with its children


_pools: Dict[int, _Pool] = {}


def run_distributed(
    fn: Callable,
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    args: Tuple = (),
    kwargs: Optional[Dict[str, Any]] = None,
    seed: int = 1234,
    timeout: float = 300.0,
) -> List[Any]:
    """Run ``fn`` on ``world_size`` gloo ranks with parallel_state(tp, pp, ep); return per-rank results."""
    job = _Job(fn, tuple(args), dict(kwargs or {}), tp, pp, ep, seed, list(sys.path))
    pool = _pools.get(world_size)
    if pool is not None and not pool.alive():
        pool.close()
        pool = None
    if pool is None:
        pool = _pools[world_size] = _Pool(world_size, start_timeout=max(timeout, 120.0))
        _register_shutdown()
    try:
        return pool.run(job, timeout)
    except BaseException:
        _pools.pop(world_size, None)
        pool.close(graceful=False)
        raise


def shutdown_pools() -> None:
    """Stop every worker pool (called at exit; tests may call it to free memory)."""
    while _pools:
        _, pool = _pools.popitem()
        pool.close()


_shutdown_registered = []


def _register_shutdown() -> None:
    """Stop the pools at exit BEFORE multiprocessing joins its (non-daemon) children.

    atexit runs handlers last-in first-out, and multiprocessing registers its join handler when
    it is first used, so ours is registered after the first pool exists.
    """
    if not _shutdown_registered:
        atexit.register(shutdown_pools)
        _shutdown_registered.append(True)


# ---------------------------------------------------------------------------------------------
# Comparing a parallel model with a single-process one, through megatron's sharded_state_dict.
# ``sharded_state_dict`` maps every local parameter to its place in the global (unsharded)
# tensor (TP slices, PP layer offsets, EP expert offsets), so one mechanism serves every layout.
# ---------------------------------------------------------------------------------------------


def _sharded_tensors(model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {
        local_key: sh
        for local_key, sh in model.sharded_state_dict().items()
        if isinstance(sh, ShardedTensor) and sh.flattened_range is None
    }


def _global_index(sh):
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(slice(off, off + size) for off, size in zip(sh.global_offset, shape))


def global_tensors(model, grads: bool = False):
    """{global key: full tensor} of a model built on ONE rank (weights, or their grads)."""
    import torch

    params = dict(model.named_parameters())
    full = {}
    for local_key, sh in _sharded_tensors(model).items():
        data = sh.data
        if grads:
            if local_key not in params or params[local_key].grad is None:
                continue
            data = params[local_key].grad
        target = full.setdefault(sh.key, torch.zeros(sh.global_shape, dtype=data.dtype))
        target[_global_index(sh)] = data.detach().reshape(target[_global_index(sh)].shape)
    return full


def load_global_tensors(model, full) -> int:
    """Copy this rank's slices of ``full`` (from :func:`global_tensors`) into ``model``; return count."""
    import torch

    count = 0
    with torch.no_grad():
        for sh in _sharded_tensors(model).values():
            if sh.key in full:
                sh.data.copy_(full[sh.key][_global_index(sh)].reshape(sh.data.shape))
                count += 1
    return count


def max_abs_diff_to_global(model, full, grads: bool = False):
    """Largest |local - global slice| over this rank's parameters (or grads), and the global keys compared."""
    params = dict(model.named_parameters())
    worst, compared = 0.0, []
    for local_key, sh in _sharded_tensors(model).items():
        if sh.key not in full:
            continue
        local = sh.data
        if grads:
            grad = params[local_key].grad if local_key in params else None
            local = grad if grad is not None else getattr(params.get(local_key), "main_grad", None)
            if local is None:
                continue
        ref = full[sh.key][_global_index(sh)].reshape(local.shape)
        worst = max(worst, (local.detach().float() - ref.float()).abs().max().item())
        compared.append(sh.key)
    return worst, sorted(set(compared))
