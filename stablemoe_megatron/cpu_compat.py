"""Make megatron-core 0.16 run on a machine without CUDA (CPU tensors, gloo collectives).

This is the project's only patch to megatron-core. It is applied by :func:`apply` only when
``torch.cuda.is_available()`` is False, and never on a GPU machine, so the CUDA code path of
megatron-core is exactly upstream's. :func:`stablemoe_megatron.parallel.initialize_distributed`
calls it, so every entry point and the test helper get it; calling it again is free.

Each patch below names the megatron-core function (or the torch function that megatron-core
calls) that it replaces and why. The patches replace private megatron-core internals: re-check
them on every megatron-core upgrade (the package pins ``megatron-core>=0.16,<0.17``), and
``tests/test_cpu_compat.py`` shows for each patch that the megatron path fails without it and
works with it.

Patches (``PATCHES`` maps name -> function):

* ``cuda_device_to_cpu`` -- a :class:`torch.overrides.TorchFunctionMode` that turns
  ``device="cuda"`` / ``device=<int>`` / ``.cuda()`` into CPU in torch calls. Replaces the hard-coded
  CUDA devices in ``pipeline_parallel/schedules.py`` (``total_num_tokens``),
  ``optimizer/optimizer.py`` (``found_inf``, ``_scale_one``), ``optimizer/clip_grads.py``
  (``get_grad_norm_fp32``, ``clip_grad_by_total_norm_fp32``), ``transformer/utils.py``
  (``get_default_causal_mask``), ``dist_checkpointing/exchange_utils.py`` and
  ``models/common/language_module`` (``.cuda()``), and makes ``Tensor.type()`` report the CUDA type
  name that ``optimizer/clip_grads.py`` ``clip_grad_by_total_norm_fp32`` asserts. One mode instead of
  dozens of call-site patches. The autograd engine runs backward without the mode, so
  ``tensor_parallel.random.CheckpointFunction.backward`` (activation recomputation re-runs layers,
  e.g. ``get_default_causal_mask``, there) enters it too.
* ``current_device_is_cpu`` -- ``torch.cuda.current_device`` returns the CPU device. Megatron
  passes it as ``device=`` in ~170 places (``utils.GlobalMemoryBuffer.get_tensor``,
  ``tensor_parallel/mappings.py``, ``param_and_grad_buffer``, ``p2p_communication`` ...); on CPU
  torch the real function raises "Torch not compiled with CUDA enabled".
* ``synchronize_is_noop`` -- ``torch.cuda.synchronize`` does nothing (there is no device queue to
  wait for). Called by ``p2p_communication._communicate_shapes`` and by ``dist_checkpointing``'s
  ``filesystem_async.FileSystemWriterAsync.preload_tensors``; without it the checkpoint save hangs.
* ``cpu_rng_tracker`` -- ``tensor_parallel.random.CudaRNGStatesTracker`` is replaced by
  :class:`CpuRNGStatesTracker` and ``random._get_cuda_rng_state`` / ``random._set_cuda_rng_state``
  by CPU-generator versions: megatron's named RNG streams (model-parallel, expert-parallel,
  data-parallel) live on the CPU default generator, forked exactly as megatron forks CUDA ones.
* ``moe_utils_te_names`` -- defines the transformer-engine names that
  ``transformer/moe/moe_utils.py`` leaves undefined without TE (``te_general_gemm`` is read by
  ``RouterGatingLinearFunction.forward``): megatron's own TopKRouter, used by our benchmark.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterable, List

import torch

_applied: List[str] = []
_lock = threading.Lock()
_CPU = torch.device("cpu")


def cuda_is_absent() -> bool:
    """True when this process cannot use CUDA: the condition under which :func:`apply` patches."""
    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# cuda_device_to_cpu
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare int device means a CUDA ordinal in torch
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaDeviceToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrite CUDA device arguments of torch calls to the CPU device.

    Handles ``device=`` keyword arguments (factory functions, ``Tensor.to``, ``empty_like`` ...),
    positional devices of ``Tensor.to``, and ``Tensor.cuda()``, which becomes a no-op.
    The overhead is a Python call per torch op, measured as negligible for the model sizes that
    run on CPU (see the compat tests).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron asserts ``grad.type() == 'torch.cuda.FloatTensor'`` (clip_grads.py
            # clip_grad_by_total_norm_fp32, optimizer.py): a CPU tensor stands in for a CUDA one.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_mode = None


def _patch_cuda_device_to_cpu() -> None:
    """Enter :class:`CudaDeviceToCpuMode` for the life of the process (main thread), and in the
    backward of megatron's activation checkpointing, which re-runs the forward there."""
    global _mode
    from megatron.core.tensor_parallel.random import CheckpointFunction

    _mode = CudaDeviceToCpuMode()
    _mode.__enter__()
    CheckpointFunction.backward = staticmethod(_in_cpu_mode(CheckpointFunction.backward))


def _in_cpu_mode(backward):
    """``backward`` run inside a :class:`CudaDeviceToCpuMode` (the engine's thread has no mode)."""
    def run(ctx, *grads):
        with CudaDeviceToCpuMode():
            return backward(ctx, *grads)

    return run


# --------------------------------------------------------------------------------------------
# current_device_is_cpu / synchronize_is_noop
# --------------------------------------------------------------------------------------------


def _cpu_current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device`` on a CPU-only machine."""
    return _CPU


def _patch_current_device() -> None:
    torch.cuda.current_device = _cpu_current_device


def _noop_synchronize(device=None) -> None:
    """Stand-in for ``torch.cuda.synchronize``: a CPU op has completed when it returns."""
    return None


def _patch_synchronize() -> None:
    torch.cuda.synchronize = _noop_synchronize


# --------------------------------------------------------------------------------------------
# cpu_rng_tracker
# --------------------------------------------------------------------------------------------


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces ``megatron.core.tensor_parallel.random._get_cuda_rng_state``."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    """Replaces ``megatron.core.tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mc_random

    class CpuRNGStatesTracker(mc_random.CudaRNGStatesTracker):
        """megatron's RNG-state tracker with its named states on the CPU default generator.

        ``add`` seeds a named state without disturbing the current one; ``fork`` swaps the named
        state in for the duration of the block and stores its advanced state afterwards. Same
        semantics as the CUDA tracker, so dropout inside tensor-parallel regions draws from the
        per-TP-rank stream exactly as on GPUs.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mc_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_name = self._current_state_name
            outer_state = torch.get_rng_state()
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    mc_random.CudaRNGStatesTracker = _make_cpu_tracker_class()
    mc_random._get_cuda_rng_state = _cpu_get_rng_state
    mc_random._set_cuda_rng_state = _cpu_set_rng_state
    # A tracker created before the patch would be a CUDA one: drop it so the next use rebuilds it.
    mc_random.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------------
# moe_utils_te_names
# --------------------------------------------------------------------------------------------

_MOE_UTILS_TE_NAMES = (
    "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
    "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function", "fused_unpermute", "te_general_gemm",
)


def _patch_moe_utils_te_names() -> None:
    """Define the transformer-engine names ``transformer/moe/moe_utils.py`` leaves undefined.

    megatron-core 0.16.1 imports them only when TE is installed but
    ``RouterGatingLinearFunction.forward`` tests ``te_general_gemm is not None`` unconditionally
    (NameError without TE). Only megatron's own TopKRouter needs this (our benchmark compares with it).
    """
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_UTILS_TE_NAMES:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


PATCHES: Dict[str, Callable[[], None]] = {
    "cuda_device_to_cpu": _patch_cuda_device_to_cpu,
    "current_device_is_cpu": _patch_current_device,
    "synchronize_is_noop": _patch_synchronize,
    "cpu_rng_tracker": _patch_rng_tracker,
    "moe_utils_te_names": _patch_moe_utils_te_names,
}


def apply(skip: Iterable[str] = (), force: bool = False) -> List[str]:
    """Apply every patch (minus ``skip``) once per process if CUDA is absent; return those applied.

    ``force`` is for tests only. On a machine with CUDA this does nothing and returns ``[]``.
    """
    if not (force or cuda_is_absent()):
        return []
    unknown = set(skip) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown cpu_compat patches {sorted(unknown)}; known: {sorted(PATCHES)}")
    with _lock:
        for name, patch in PATCHES.items():
            if name not in skip and name not in _applied:
                patch()
                _applied.append(name)
    return list(_applied)


def applied() -> List[str]:
    """Names of the patches applied in this process."""
    return list(_applied)
