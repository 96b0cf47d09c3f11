"""Shared benchmark helpers: interleaved timing, robust statistics, a host-sync counter, machine info.

Timing method (every bench script): the variants are timed side by side in ONE process and ONE
run. After ``warmup`` untimed rounds, each of ``repeats`` rounds times every variant once, in an
order rotated by one position per round (no variant is always first or last), each sample being
the mean of ``inner`` back-to-back calls. On a GPU every sample is bracketed by
``torch.cuda.synchronize()``. Reported per variant: the median sample and its interquartile
range; per comparison: the median over rounds of the per-round ratio (variant / reference, both
measured in the same round, so slow phases of a shared machine cancel) with its interquartile
range.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from stablemoe_megatron.runtime import free_port

# The paper's model settings where Megatron-LM's defaults (which the trainer follows) differ, and the
# quieter evaluation/logging the benchmarks always ran with.
PAPER_MODEL_FLAGS = ["--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear",
                     "--eval-iters", "10", "--log-interval", "10"]


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
def config_size(name: str, vocab: int) -> dict:
    """A benchmark size from ``configs/<name>.yaml`` (the recipes' SIZE files): shape, micro-batch, bf16.

    ``vocab`` is the benchmark's own (its batches are synthetic token ids, no tokenizer).
    """
    from stablemoe_megatron.size_configs import load_size

    config = load_size(name)
    model, moe, training = config["model"], config["moe"], config["training"]
    return dict(layers=model["num_layers"], hidden=model["hidden_size"], ffn=model["ffn_hidden_size"],
                heads=model["num_attention_heads"], seq=model["seq_length"], experts=moe["num_experts"],
                sublayers=moe["sublayers_per_expert"], micro=training["micro_batch_size"], vocab=vocab,
                bf16=bool(training.get("bf16", False)))


# ------------------------------------------------------------------------------------------------
# process set-up
# ------------------------------------------------------------------------------------------------
_ALLOCATOR = ["system default"]


def keep_freed_cpu_memory() -> None:
    """On CPU, make glibc keep freed buffers instead of returning them to the OS (``mallopt``).

    By default glibc serves every buffer over 128 KB-32 MB with a fresh ``mmap`` and unmaps it on
    free, so each call of a layer page-faults its megabyte-sized temporaries back in; how often
    depends on the heap's history, which adds noise of the order of the routing time itself
    (seen here: the same variant at 0.65x in one run and 0.90x in the next). With a 32 MB mmap
    threshold and no trimming, buffers are reused as the GPU caching allocator reuses them. Both
    sides of every ratio run in the same process, so they get the same allocator; the setting is
    printed with the machine. No-op off glibc or on GPU runs.
    """
    if torch.cuda.is_available():
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
            _ALLOCATOR[0] = "glibc, freed memory kept (mallopt mmap threshold 32 MB, no trim)"
    except (OSError, AttributeError):
        pass


def init_single_process(threads: Optional[int] = None) -> None:
    """A world of one (gloo on CPU, NCCL on GPU) with megatron's parallel_state, for the benches.

    Uses torchrun's environment when present, else a free local port (never the default 29500,
    which concurrent test runs may hold). On CPU the allocator keeps freed memory
    (:func:`keep_freed_cpu_memory`).
    """
    keep_freed_cpu_memory()
    if threads:
        torch.set_num_threads(threads)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed, seed_everything

    initialize_distributed(ParallelSizes())
    seed_everything(1234)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def compat_mode_paused():
    """Pause stablemoe_megatron.cpu_compat's per-op TorchFunctionMode while timing on CPU.

    The mode (a CPU-only shim that rewrites ``device="cuda"`` arguments; never active on a GPU)
    costs a Python call per torch op, which would inflate the op-count-heavy MoE-layer timings
    in proportion to the number of ops rather than their cost. The MoE layers do not need it.
    No-op when the mode is not installed (GPU machines).
    """
    from stablemoe_megatron import cpu_compat

    mode = getattr(cpu_compat, "_mode", None)
    stack = torch._C._len_torch_function_stack()
    if mode is None or stack == 0:
        yield
        return
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if _get_current_function_mode() is not mode:
        yield  # someone else's mode on top: leave the stack alone
        return
    with _pop_mode_temporarily():
        yield


def machine_info() -> Dict[str, str]:
    """What the numbers were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": _cpu_name(),
        "cores": str(os.cpu_count()),
    }
    try:
        import megatron.core

        info["megatron-core"] = getattr(megatron.core, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    else:
        info["gpu"] = "none"
        info["allocator"] = _ALLOCATOR[0]
    try:
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def print_machine(prefix: str = "") -> None:
    print(prefix + "machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items()))


# ------------------------------------------------------------------------------------------------
# statistics and interleaved timing
# ------------------------------------------------------------------------------------------------
def quantiles(values: Sequence[float]):
    """(p25, median, p75) of ``values`` (inclusive method; a single value gives it three times)."""
    values = sorted(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


@dataclass
class Timings:
    """Samples (seconds per call) of every variant, sample i of each taken in round i."""

    samples: Dict[str, List[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return quantiles(self.samples[name])[1]

    def ratio(self, name: str, reference: str):
        """(p25, median, p75) over rounds of samples[name][i] / samples[reference][i]."""
        pairs = zip(self.samples[name], self.samples[reference])
        return quantiles([a / b for a, b in pairs])


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 3,
                     inner: int = 1) -> Timings:
    """Time every fn side by side (see the module doc). Returns seconds per call."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize()
    timings = Timings({name: [] for name in names})
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            synchronize()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize()
            timings.samples[name].append((time.perf_counter() - start) / inner)
    return timings


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_spread(p25: float, med: float, p75: float, unit: Callable[[float], str] = fmt_time) -> str:
    return f"{unit(med)} [{unit(p25)}, {unit(p75)}]"


def fmt_ratio(q) -> str:
    p25, med, p75 = q
    return f"{med:.3f}x [{p25:.3f}, {p75:.3f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# device-to-host synchronisations
# ------------------------------------------------------------------------------------------------
_T = torch.Tensor
# Ops that block the host on a CUDA tensor: they copy a value to the host, or must know a
# data-dependent output size before they can allocate it.
_ALWAYS_SYNC = {
    _T.item: "item", _T.tolist: "tolist", _T.cpu: "cpu", _T.numpy: "numpy",
    _T.__bool__: "bool", _T.__int__: "int", _T.__float__: "float", _T.__index__: "index",
    torch.nonzero: "nonzero", _T.nonzero: "nonzero", torch.argwhere: "argwhere", _T.argwhere: "argwhere",
    torch.masked_select: "masked_select", _T.masked_select: "masked_select",
    torch.bincount: "bincount", _T.bincount: "bincount",  # CUDA bincount reads min and max back
    torch.unique: "unique", _T.unique: "unique", torch.unique_consecutive: "unique_consecutive",
    _T.unique_consecutive: "unique_consecutive",
}
_TO_HOST = {_T.item, _T.tolist, _T.cpu, _T.numpy, _T.__bool__, _T.__int__, _T.__float__, _T.__index__}


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _flat_tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _flat_tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _flat_tensors(item, out)
    return out


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Count the operations that would block the host on a GPU, while running on any device.

    On a CPU-only machine every tensor is a host tensor, so "device-to-host copy" has to be
    modelled: this mode tracks which tensors WOULD live on the GPU. Tensors marked with
    :meth:`mark_host` (the CPU copy of the token ids, host lookup tables), the results of
    host-producing calls (``.cpu()``, ``.tolist()`` ...) and the results of ops whose tensor inputs
    are all host tensors are host tensors; factory calls are host tensors unless given a
    ``device=``; ``Tensor.to(<device>)`` of a host tensor is a device tensor (a host-to-device copy,
    which does not block); everything else is a device tensor. A sync is counted when a device
    tensor goes through one of: ``.item/.tolist/.cpu/.numpy``, ``bool()/int()/float()``,
    ``nonzero/argwhere/masked_select/unique/bincount`` (data-dependent output size; CUDA
    ``bincount`` reads its min and max back), indexing with a boolean mask, and
    ``repeat_interleave`` with tensor repeats and no ``output_size``. Forward only: kernels run by
    autograd in the backward are not seen by torch-function modes.
    """

    def __init__(self):
        super().__init__()
        self._host: Dict[int, weakref.ref] = {}
        self.events: List[str] = []

    # -- host marking ---------------------------------------------------------------------------
    def mark_host(self, *tensors) -> None:
        for t in _flat_tensors(list(tensors), []):
            key = id(t)
            self._host[key] = weakref.ref(t, lambda _ref, key=key: self._host.pop(key, None))

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    @property
    def count(self) -> int:
        return len(self.events)

    def summary(self) -> str:
        if not self.events:
            return "-"
        names: Dict[str, int] = {}
        for e in self.events:
            names[e] = names.get(e, 0) + 1
        return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in names.items())

    # -- the mode -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _flat_tensors([args, kwargs], [])
        on_device = any(not self.is_host(t) for t in inputs)
        out = func(*args, **kwargs)
        sync = None
        if on_device:
            if func in _ALWAYS_SYNC:
                sync = _ALWAYS_SYNC[func]
            elif func is _T.__getitem__ and _is_bool_index(args[1]):
                sync = "bool-mask index"
            elif func is _T.__setitem__ and _is_bool_index(args[1]) and isinstance(args[2], torch.Tensor):
                sync = "bool-mask assignment"
            elif func in (torch.repeat_interleave, _T.repeat_interleave) and kwargs.get("output_size") is None \
                    and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].numel() > 1:
                sync = "repeat_interleave"
            elif func is torch.where and len(args) == 1 and not kwargs:
                sync = "where(cond)"
        if sync is not None:
            self.events.append(sync)
        host_result = (func in _TO_HOST) or (inputs and not on_device) or (not inputs and "device" not in kwargs)
        if func is _T.to and not on_device and _to_has_device(args, kwargs):
            host_result = False  # host -> device copy
        if host_result:
            self.mark_host(out if isinstance(out, (list, tuple)) else [out])
        return out


def _to_has_device(args, kwargs) -> bool:
    if "device" in kwargs:
        return True
    for a in args[1:]:
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return True
        if isinstance(a, torch.Tensor):
            return True
    return False


@contextlib.contextmanager
def count_host_syncs(host_tensors=()):
    """``with count_host_syncs(host_ids) as counter: ...; counter.count``."""
    counter = HostSyncCounter()
    counter.mark_host(*host_tensors)
    with counter:
        yield counter


@contextlib.contextmanager
def count_dispatcher_host_copies():
    """Count every ``moe.dispatcher._to_host`` call, whether or not the tensor is on a GPU.

    The library counter (``device_to_host_copies()``) counts only real copies from a non-CPU
    device; on a CPU machine this makes each call count (where a GPU run would copy). Yields a
    function returning the count since entry.
    """
    from stablemoe_megatron.moe import dispatcher

    original = dispatcher._to_host
    start = dispatcher.device_to_host_copies()

    def counting_to_host(tensor):
        if tensor.device.type == "cpu":
            dispatcher._D2H_COPIES[0] += 1
        return original(tensor)

    dispatcher._to_host = counting_to_host
    try:
        yield lambda: dispatcher.device_to_host_copies() - start
    finally:
        dispatcher._to_host = original
