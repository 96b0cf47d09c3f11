"""Run a function on N gloo ranks with megatron-core's parallel_state set up: the multi-rank test helper.

    results = run_distributed(fn, world_size=2, tp=2, args=(x,))   # one return value per rank

``fn`` must be importable by module and name (a module-level function in a test file). Each rank
runs ``fn(*args, **kwargs)`` after ``initialize_model_parallel(tp, pp, ep, etp)`` and
``seed_everything(seed)``; parallel_state is destroyed afterwards (with its process groups, so a
worker does not collect gloo threads). If any rank raises, the call raises
:class:`DistributedTestError` carrying that rank's traceback. If the ranks do not all finish
within ``timeout`` seconds (a hung collective), the workers are killed and the call raises.

Starting a process that imports torch and megatron-core costs ~6 s of CPU, so worker processes
are kept alive between calls, one pool per world size (:class:`stablemoe_megatron.runtime.GlooPool`),
with the default process group created once; each call only rebuilds parallel_state. A failed or
timed-out call discards its pool, so the next call starts clean. Pools are shut down at
interpreter exit.
"""
from __future__ import annotations

import atexit
import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from stablemoe_megatron.runtime import GlooPool


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
    etp: int = 1


def _run_job(job: _Job) -> Any:
    """In a worker: parallel_state for the job's layout, seeds, ``fn``, then parallel_state torn down."""
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
        initialize_parallel_state(ParallelSizes(job.tp, job.pp, job.ep, job.etp), timeout_minutes=5)
        seed_everything(job.seed)
        _reset_megatron_globals()
        return job.fn(*job.args, **job.kwargs)
    finally:
        try:
            destroy_parallel_state()
        except Exception:  # noqa: BLE001 - the job's own error matters more
            pass


def _reset_megatron_globals() -> None:
    """Process-wide megatron state a previous job may have left behind in a reused worker."""
    from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # set by the pipeline schedules


def _start_pool(world_size: int, start_timeout: float) -> GlooPool:
    """``world_size`` workers in one gloo world (default group only; 5-minute collective timeouts).

    One torch thread each: identical float reduction order in every pool, so results compare
    across world sizes. A ConfigError of a test function is a failure like any other (traceback).
    """
    from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed

    setup = functools.partial(initialize_distributed, ParallelSizes(), timeout_minutes=5)
    return GlooPool(world_size, setup, threads=1, start_timeout=start_timeout,
                    error=DistributedTestError, config_errors=False)


_pools: Dict[int, GlooPool] = {}


def run_distributed(
    fn: Callable,
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int = 1,
    args: Tuple = (),
    kwargs: Optional[Dict[str, Any]] = None,
    seed: int = 1234,
    timeout: float = 300.0,
) -> List[Any]:
    """Run ``fn`` on ``world_size`` gloo ranks with parallel_state(tp, pp, ep, etp); return per-rank results."""
    job = _Job(fn, tuple(args), dict(kwargs or {}), tp, pp, ep, seed, list(sys.path), etp)
    pool = _pools.get(world_size)
    if pool is not None and not pool.alive():
        pool.close()
        pool = None
    if pool is None:
        pool = _pools[world_size] = _start_pool(world_size, start_timeout=max(timeout, 120.0))
        _register_shutdown()
    try:
        return pool.run(_run_job, (job,), timeout=timeout, what=getattr(fn, "__name__", str(fn)))
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
