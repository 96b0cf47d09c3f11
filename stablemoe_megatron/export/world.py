"""The CPU process group that ``convert_checkpoint import`` / ``reshard`` start for themselves.

The target layout needs ``pp x lcm(tp, ep)`` ranks (megatron's groups), so the tool starts that
many local processes (``multiprocessing`` spawn), joins them in a gloo group on 127.0.0.1 and
initialises megatron's parallel_state for the layout, then runs one function on every rank.
Conversion is I/O and copying, so no GPU is used even where one exists (``CUDA_VISIBLE_DEVICES``
is emptied in the workers): the tool runs on a login or CPU node, not under torchrun.

A worker's ConfigError comes back as a ConfigError (one message); any other failure as a
RuntimeError carrying the worker's traceback. When one worker fails the others are stopped, so a
rank waiting in a collective never hangs the tool.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable, List, Tuple

from stablemoe_megatron.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, sizes: Tuple[int, int, int], fn: Callable, args: tuple,
            results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed

        initialize_distributed(ParallelSizes(*sizes), rank=rank, world_size=world)
        results.put((rank, "ok", fn(*args)))
    except ConfigError as exc:
        results.put((rank, "config", str(exc)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def run_world(fn: Callable, world: int, sizes: Tuple[int, int, int], args: tuple = (),
              timeout: float = 24 * 3600.0) -> List[Any]:
    """Run ``fn(*args)`` on ``world`` fresh gloo ranks with parallel sizes (tp, pp, ep); per-rank results.

    ``fn`` must be importable by module and name (spawned workers re-import it).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, sizes, fn, args, results))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        return _collect(procs, results, timeout)
    finally:
        stop_processes(procs)


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


def _collect(procs, results, timeout: float) -> List[Any]:
    import time

    deadline = time.monotonic() + timeout
    values = {}
    while len(values) < len(procs):
        try:
            rank, status, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in values]
            if dead:
                raise RuntimeError(f"conversion worker rank(s) {dead} died (exit codes "
                                   f"{[procs[r].exitcode for r in dead]}); out of memory?")
            if time.monotonic() > deadline:
                raise RuntimeError(f"conversion workers did not finish within {timeout:.0f} s")
            continue
        if status == "config":
            raise ConfigError(value)
        if status == "error":
            raise RuntimeError(f"conversion worker rank {rank} failed:\n{value}")
        values[rank] = value
    return [values[rank] for rank in range(len(procs))]
