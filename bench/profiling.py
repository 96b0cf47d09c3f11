"""Where a training step's time goes, and how much memory a call takes at its peak (torch.profiler).

Time breakdown (:func:`breakdown`): the parts of a model are wrapped in ``record_function`` ranges
for the duration of the profile only (:func:`categorized`): ``routing`` (the router, and the token
shuffle's permutation when it moves rows), ``dispatch`` (the dispatcher's dispatch and combine),
``experts`` (the expert stacks), ``optimizer`` (megatron's optimizer step: gradient norm,
clipping, Adam, and the distilled routers' own optimizer in stage 1). Every profiled op's SELF time
goes to the range it ran in; a backward op goes to the range of the forward op that created its
autograd node (matched by the autograd sequence number, which the profiler records for both), so
the backward of the experts counts as ``experts``. The rest is ``other`` (attention, dense layers,
embeddings, LM head and loss, DDP's gradient buffers, the schedule's bookkeeping).

Peak memory (:func:`peak_memory`): on a GPU ``torch.cuda.max_memory_allocated`` above the memory
allocated before the call; on the CPU the profiler's allocator events (every allocation and free
of the CPU allocator, ``profile_memory=True``) summed in time order, their running maximum.
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from typing import Callable, Dict, Iterator, List

import torch

CATEGORIES = ("routing", "dispatch", "experts", "optimizer", "other")
_PREFIX = "bench::"
_BACKWARD = "autograd::engine::evaluate_function: "


def _wrap(obj, method: str, category: str, undo: List) -> None:
    original = getattr(obj, method)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(_PREFIX + category):
            return original(*args, **kwargs)

    had_own = method in vars(obj)
    setattr(obj, method, wrapped)
    undo.append(lambda: setattr(obj, method, original) if had_own else delattr(obj, method))


@contextlib.contextmanager
def categorized(model, optimizers=()) -> Iterator[None]:
    """Wrap the MoE layers' router / dispatcher / experts of ``model`` and the ``optimizers``' step
    in ``record_function`` ranges named after :data:`CATEGORIES` (restored on exit)."""
    undo: List[Callable[[], None]] = []
    try:
        for layer in getattr(model, "moe_layers", ()):
            _wrap(layer.router, "forward", "routing", undo)
            if layer.shuffle is not None:
                _wrap(layer.shuffle, "shuffle", "routing", undo)
                _wrap(layer.shuffle, "unshuffle", "routing", undo)
            _wrap(layer.dispatcher, "dispatch", "dispatch", undo)
            _wrap(layer.dispatcher, "combine", "dispatch", undo)
            _wrap(layer.experts, "forward", "experts", undo)
        for optimizer in optimizers:
            if optimizer is not None:
                _wrap(optimizer, "step", "optimizer", undo)
        yield
    finally:
        for restore in reversed(undo):
            restore()


def _category_of(event, by_sequence: Dict[int, str]) -> str:
    """The category of a profiler event: its innermost category range, or for an op under a
    backward node, the category of the forward op with the node's sequence number."""
    node = event
    while node is not None:
        if node.name.startswith(_PREFIX):
            return node.name[len(_PREFIX):]
        if node.name.startswith(_BACKWARD):
            return by_sequence.get(node.sequence_nr, "other")
        node = node.cpu_parent
    return "other"


def attribute(events) -> Dict[str, float]:
    """Self CPU time (microseconds) of the profiler ``events`` (``prof.events()``) per category."""
    forward_category: Dict[int, str] = {}
    for event in events:  # forward ops that created autograd nodes, by their sequence number
        if event.sequence_nr >= 0 and not event.name.startswith(_BACKWARD):
            category = _category_of(event, {})
            if category != "other" and not _under_backward(event):
                forward_category.setdefault(event.sequence_nr, category)
    totals: Dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith(_PREFIX) or event.name == "[memory]":
            continue
        totals[_category_of(event, forward_category)] += event.self_cpu_time_total
    return {name: totals.get(name, 0.0) for name in CATEGORIES}


def _under_backward(event) -> bool:
    node = event.cpu_parent
    while node is not None:
        if node.name.startswith(_BACKWARD):
            return True
        node = node.cpu_parent
    return False


def breakdown(step: Callable[[], object], model, optimizers=(), steps: int = 3) -> Dict[str, float]:
    """Milliseconds per step in each category (and ``total``), over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with categorized(model, optimizers), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_step = {name: value / 1000.0 / steps for name, value in attribute(prof.events()).items()}
    per_step["total"] = sum(per_step.values())
    return per_step


def peak_memory(fn: Callable[[], object]) -> int:
    """Bytes: the peak of memory allocated while ``fn()`` runs, above what was allocated before."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak
