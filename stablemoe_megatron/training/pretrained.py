"""Starting a run from another run's weights: Megatron-LM's ``--pretrained-checkpoint`` and
``--finetune``, and ``--moe-use-upcycling``.

Which checkpoint, with Megatron-LM's flag semantics (its ``load_checkpoint``):

* ``--pretrained-checkpoint DIR``: when ``--load`` holds no checkpoint yet, start from DIR's
  weights at iteration 0 with a fresh optimizer, scheduler and RNG; once the run has saved into
  ``--load``, a restart resumes from there as usual.
* ``--load DIR --finetune``: DIR's weights only, iteration 0, no optimizer, no RNG.
* ``--no-load-rng`` (a resume): the RNG states stay as this run seeded them (:func:`rng_kept`).

DIR is a Megatron-LM torch_dist checkpoint (``pretrain_gpt.py`` with megatron-core's GPTModel:
``iter_XXXXXXX/`` with the dist_checkpointing files, ``common.pt`` holding ``args``,
``iteration``, ``checkpoint_version``; the tracker ``latest_checkpointed_iteration.txt``, or
``release``) or one of ours (the same files plus ``run_config.yaml`` and ``train_state.json``).
Its iteration comes from ``train_state.json``, else ``common.pt``, else the tracker.

Which weights. Our model is megatron-core's GPTModel, so the checkpoint's sharded keys are ours
for every dense part (megatron maps the local spec's norm names onto transformer-engine's, so
``input_layernorm`` is stored as ``self_attention.linear_qkv.layer_norm_weight`` by both).
What can differ, and how it is handled (:func:`load_pretrained`):

* layer stacking: a dense model stores each tensor once for all layers (``decoder.layers.X``,
  with a leading layer axis); our MoE models store each layer apart (``decoder.layers.N.X``,
  ``hetereogenous_dist_checkpoint``). The model's sharded state dict is built in the
  checkpoint's style, so megatron reads each layer's slice.
* MoE parts that are ours only (``mlp.router``, ``mlp.experts``, ``moe_block``): initialised
  fresh as built (the routers always), or upcycled; the dense MLPs that Megatron-layout MoE layers
  replace are not loaded.
* anything else missing or unexpected: a ConfigError listing the keys.
* transformer-engine extra state (``_extra_state``, fp8 metadata) is not loaded; the vocabulary
  may be padded differently (megatron's ``allow_shape_mismatch``: the common rows are read, the
  rest are zero).

Upcycling (``--moe-use-upcycling``, from a dense checkpoint): every expert starts as a copy of the
dense MLP it grows from, the router as built (fresh). Megatron layout: the MLP of the same layer,
which the MoE layer replaces (fc1 and fc2, weights and biases; the layer's pre-MLP norm loads by
key). Paper layout: each expert sublayer (fc1, its norm from the layer's pre-MLP norm) copies the
MLP of the transformer layer the MoE block is attached to; fc2 follows ``--moe-expert-output-init``:
``zero`` (the default) keeps the block's start as the identity, so the upcycled model computes
exactly the dense model's function at step 0; ``normal`` copies fc2 as well (whole copies; the
block then adds ``g * (z_K - h)`` on top of the dense model). No rescaling: megatron-core's
``upcycling_utils`` multiplies the copies by ``sqrt(N / k)`` for its pre-softmax router's ``1/N``
gates (arXiv 2410.07524) and looks for megatron's expert classes directly under ``mlp.experts``;
our gates differ per router (1 for hash, a sigmoid for StableMoE) and our experts are stacks
(``experts.sublayers.k``), so the copies are exact and a Megatron-layout MoE layer computes
``g_t * MLP(x_t)`` at step 0: the dense model itself for a gate-free router (hash).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from stablemoe_megatron.checkpoint import (
    CONFIG_FILE,
    MEGATRON_METADATA,
    STATE_FILE,
    TRACKER,
    complete_iterations,
    iteration_dir,
    read_train_state,
    verify_files,
)
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.runtime import is_first_rank
from stablemoe_megatron.training.checkpointing import unwrap

MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")
MOE_PARTS = (".mlp.router.", ".mlp.experts.", ".moe_block.")  # only in our MoE layers
DENSE_MLP_SUFFIXES = (".mlp.linear_fc1.weight", ".mlp.linear_fc1.bias", ".mlp.linear_fc2.weight",
                      ".mlp.linear_fc2.bias")
# (local-spec name, transformer-engine name) of the same norm: megatron's key map makes both
# specs store the second; a transformer-engine MoE layer's separate pre-MLP norm stores the first
NORM_ALIASES = (("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
                ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"))
# what an upcycled expert copies: {our name: the dense layer's stored name}
UPCYCLE_SOURCES = {"fc1.weight": "mlp.linear_fc1.weight", "fc1.bias": "mlp.linear_fc1.bias",
                   "fc2.weight": "mlp.linear_fc2.weight", "fc2.bias": "mlp.linear_fc2.bias",
                   "norm.weight": "mlp.linear_fc1.layer_norm_weight", "norm.bias": "mlp.linear_fc1.layer_norm_bias"}
_PER_LAYER_KEY = re.compile(r"decoder\.layers\.\d+\.")
_EXPERT_PARAM = (re.compile(r"local_experts\.\d+\.linear_fc([12])\.(weight|bias)"),  # SequentialMLP
                 re.compile(r"linear_fc([12])\.(weight|bias)\d+"))  # TEGroupedMLP


@dataclass
class WeightsSource:
    """A checkpoint whose weights start the run (found and checked by preflight)."""

    directory: Path  # its iter_XXXXXXX (or release) directory
    flag: str  # how it was named, for messages: "--pretrained-checkpoint DIR" / "--load DIR --finetune"
    iteration: int  # the iteration it was saved at
    ours: bool  # written by this trainer (run_config.yaml, train_state.json), else Megatron-LM's
    args: object = None  # Megatron-LM's args Namespace from common.pt (None when it holds none)

    def describe(self) -> str:
        whose = "this trainer" if self.ours else "Megatron-LM"
        return f"iteration {self.iteration} of {whose}'s checkpoint {self.directory}"


# -- finding the checkpoint (no process group needed) ------------------------------------------------
def find_weights_source(path, flag: str) -> WeightsSource:
    """The checkpoint ``path`` names (a run directory with a tracker, or one ``iter_*``/``release``
    directory), its files checked against its index, its iteration and Megatron-LM args read."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{flag}: no such directory")
    directory, tracked = _iteration_directory(root, flag)
    verify_files(directory)
    ours = (directory / CONFIG_FILE).is_file() and (directory / STATE_FILE).is_file()
    common = _common_state(directory, flag)
    iteration = read_train_state(directory).iteration if ours else int(common.get("iteration", tracked or 0))
    return WeightsSource(directory, flag, iteration, ours, common.get("args"))


def megatron_lm_directory(load) -> Optional[Path]:
    """The checkpoint directory ``load`` names when it is Megatron-LM's (no train_state.json), else None."""
    try:
        directory, _ = _iteration_directory(Path(load), "--load")
    except ConfigError:
        return None
    return None if (directory / STATE_FILE).is_file() or (directory / CONFIG_FILE).is_file() else directory


def _iteration_directory(root: Path, flag: str) -> Tuple[Path, Optional[int]]:
    """(the torch_dist directory, the tracker's iteration) for a run directory or a checkpoint directory."""
    if (root / MEGATRON_METADATA).is_file():
        return root, None
    tracker = root / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            directory, number = root / "release", 0
        elif text.isdigit():
            number = int(text)
            directory = iteration_dir(root, number)
        else:
            raise ConfigError(f"{flag}: {tracker} holds {text!r}, neither an iteration number nor 'release'")
    else:
        found = complete_iterations(root)
        if not found:
            raise ConfigError(f"{flag}: {root} has no {TRACKER} and is no checkpoint directory itself (no "
                              f"{MEGATRON_METADATA}): name a Megatron-LM or this trainer's checkpoint directory "
                              f"(the one holding the tracker) or one of its iter_* directories")
        number = found[-1]
        directory = iteration_dir(root, number)
    if not (directory / MEGATRON_METADATA).is_file():
        raise ConfigError(f"{flag}: {directory} is not a torch_dist checkpoint (no {MEGATRON_METADATA}); only "
                          f"megatron-core dist_checkpointing checkpoints (--ckpt-format torch_dist) are read")
    return directory, number


def _common_state(directory: Path, flag: str) -> dict:
    """``common.pt`` read by megatron-core itself (its safe globals admit Megatron-LM's Namespace)."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as exc:  # noqa: BLE001 - any failure is an unreadable file for the user
        raise ConfigError(f"{flag}: {directory}/common.pt cannot be read ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})") from None
    return common if isinstance(common, dict) else {}


@contextmanager
def rng_kept(keep: bool):
    """With ``keep`` (``--no-load-rng``), the RNG states after the block are those before it,
    whatever a checkpoint load inside restored: Megatron-LM's ``--no-load-rng``."""
    if not keep:
        yield
        return
    from stablemoe_megatron.training.checkpointing import _rng_state, _set_rng_state

    state = _rng_state()
    yield
    _set_rng_state(state)


# -- loading (collective: every rank) -------------------------------------------------------------------
@dataclass
class _Plan:
    to_load: dict  # {local state-dict key: sharded entry whose key the checkpoint holds}
    fresh: List[str]  # local keys of our MoE parts left as built
    replaced: List[str]  # stored dense-MLP keys that Megatron-layout MoE layers replace


def load_pretrained(trainer, source: WeightsSource) -> None:
    """Load ``source``'s weights into ``trainer.model`` (see the module docstring); every rank calls it.

    The trainer's state stays at iteration 0 (no optimizer, scheduler or RNG state is read);
    the optimizer's fp32 main parameters (bf16 runs) are refreshed from the loaded weights.
    """
    config = trainer.config
    model = unwrap(trainer.model)
    stored = _stored_model_tensors(source.directory)
    per_layer = any(_PER_LAYER_KEY.match(key) for key in stored)
    plan = _plan(_sharded_state_in_style(model, per_layer), stored, source, config.moe.megatron_layout)
    loaded = _load(source, {"model": plan.to_load})["model"]
    with torch.no_grad():
        result = model.load_state_dict({key: loaded[key] for key in plan.to_load}, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"loading {source.directory}: unexpected keys {result.unexpected_keys[:5]}")
    upcycled = _upcycle(model, config, source, stored, per_layer) if config.moe.use_upcycling else []
    if trainer.optimizer is not None:
        trainer.optimizer.reload_model_params()  # bf16: the fp32 main params follow the loaded weights
    if is_first_rank():
        print(_summary(source, plan, upcycled), flush=True)


def _stored_model_tensors(directory: Path) -> dict:
    """{sharded key: ShardedTensor (global shape, dtype)} of the checkpoint's model tensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    return {key: meta for key, meta in load_tensors_metadata(str(directory)).items()
            if key.startswith(MODEL_KEY_PREFIXES) and isinstance(meta, ShardedTensor)}


def _sharded_state_in_style(model, per_layer: bool) -> dict:
    """The model's sharded state dict with layers keyed as the checkpoint keys them: apart
    (``decoder.layers.N.X``) or stacked (``decoder.layers.X``, a leading layer axis)."""
    config = model.config
    before = config.hetereogenous_dist_checkpoint
    config.hetereogenous_dist_checkpoint = per_layer
    try:
        return model.sharded_state_dict()
    finally:
        config.hetereogenous_dist_checkpoint = before


def _plan(sharded: dict, stored: dict, source: WeightsSource, megatron_layout: bool) -> _Plan:
    """Match the model's sharded entries to the stored keys; ConfigError listing any mismatch."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    to_load, fresh, missing, used = {}, [], set(), set()
    for local_key, entry in sharded.items():
        if not isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
            continue  # extra state (ShardedObjects) and non-persistent entries stay as built
        key = entry.key
        if key not in stored and isinstance(entry, ShardedTensor):
            key = entry.key = _norm_alias(key, stored) or key
        if key in stored:
            to_load[local_key] = entry
            used.add(key)
        elif any(part in key for part in MOE_PARTS):
            fresh.append(local_key)
        else:
            missing.add(key)
    unused = sorted(set(stored) - used)
    replaced = [key for key in unused if megatron_layout and key.endswith(DENSE_MLP_SUFFIXES)]
    unexpected = [key for key in unused if key not in replaced]
    if missing or unexpected:
        raise ConfigError(f"{source.flag}: the checkpoint's tensors do not fit this model although the model "
                          f"settings agree: {_listing('missing in the checkpoint', sorted(missing))}"
                          f"{'; ' if missing and unexpected else ''}"
                          f"{_listing('in the checkpoint but not in this model', unexpected)}")
    return _Plan(to_load, fresh, replaced)


def _listing(what: str, keys: List[str], limit: int = 8) -> str:
    if not keys:
        return ""
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{what}: {', '.join(keys[:limit])}{more}"


def _norm_alias(key: str, stored: dict) -> Optional[str]:
    """The stored key of the same norm under the other spec's name (see NORM_ALIASES), if any."""
    for local, te in NORM_ALIASES:
        for old, new in ((local, te), (te, local)):
            if old in key and key.replace(old, new) in stored:
                return key.replace(old, new)
    return None


def _load(source: WeightsSource, sharded: dict) -> dict:
    """megatron dist_checkpointing.load of exactly ``sharded``; failures become ConfigErrors.

    Partial reads are allowed (one layer's slice of a stacked tensor; a tensor every rank
    reads whole), so the integrity check of a complete save does not apply. megatron describes a
    stacked tensor's slice with a prepended axis and a regular grid, which it can only read when
    the slices requested by ALL ranks cover the grid; each request is therefore given as a plain
    chunk (the leading 1-sized axis made real, no grid), the shape-agnostic form of megatron's
    reader, and reshaped back afterwards. Factories (e.g. SwiGLU's fc1 halves) are applied before
    and merged after, as megatron's own load does.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, dict_list_map_outplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from torch.distributed.checkpoint.api import CheckpointException

    request, _, factories = load_preprocess(sharded)
    shapes = dict_list_map_outplace(lambda x: tuple(x.data.shape) if isinstance(x, ShardedTensor) else None, request)
    dict_list_map_inplace(lambda x: _plain_chunk(x) if isinstance(x, ShardedTensor) else x, request)
    try:
        loaded = dist_checkpointing.load(request, str(source.directory), validate_access_integrity=False)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a shape or file problem for the user
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise ConfigError(f"{source.flag}: reading {source.directory} failed ({type(exc).__name__}: {first})") from exc
    return apply_factory_merges(_reshaped(loaded, shapes), factories)


def _plain_chunk(sh):
    """``sh`` with its prepended axes as real 1-sized axes of its data (a view) and no grid."""
    from dataclasses import replace

    ones = (1,) * sh.prepend_axis_num
    return replace(sh, data=sh.data.view(ones + tuple(sh.data.shape)), local_shape=ones + tuple(sh.local_shape),
                   prepend_axis_num=0, axis_fragmentations=None)


def _reshaped(loaded, shapes):
    """``loaded``'s entries at the places of ``shapes`` (a nested dict/list), each viewed as its shape."""
    if isinstance(shapes, dict):  # (an empty request, e.g. a pipeline stage without MoE layers, reads nothing)
        return {key: _reshaped(loaded.get(key, {}), value) for key, value in shapes.items()}
    if isinstance(shapes, list):
        return [_reshaped(item, value) for item, value in zip(loaded, shapes)]
    return loaded.view(shapes) if shapes is not None else loaded


# -- upcycling -------------------------------------------------------------------------------------
def _upcycle(model, config, source: WeightsSource, stored: dict, per_layer: bool) -> List[Tuple[int, bool]]:
    """Copy each MoE layer's dense source MLP into all its experts (see the module docstring);
    [(layer number, fc2 copied)] of this pipeline stage's MoE layers."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    requests: Dict[str, dict] = {}
    for layer in model.moe_layers:
        number, wanted = layer.layer_number, {}
        for short, name in UPCYCLE_SOURCES.items():
            key = f"decoder.layers.{number - 1}.{name}" if per_layer else f"decoder.layers.{name}"
            meta = stored.get(key)
            if meta is None:
                continue
            if per_layer:
                wanted[short] = ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))
            else:
                layers = meta.global_shape[0]
                wanted[short] = ShardedTensor.from_rank_offsets(
                    key, torch.empty(meta.global_shape[1:], dtype=meta.dtype), (0, number - 1, layers),
                    prepend_axis_num=1)
        if "fc1.weight" not in wanted or "fc2.weight" not in wanted:
            raise ConfigError(f"--moe-use-upcycling: {source.flag} has no dense MLP for layer {number} "
                              f"(no {UPCYCLE_SOURCES['fc1.weight']} there): upcycling starts from a dense model")
        requests[str(number)] = wanted
    loaded = _load(source, {"upcycle": requests})["upcycle"]  # every rank calls it (a collective)
    done = []
    with torch.no_grad():
        for layer in model.moe_layers:
            copy_fc2 = not layer.experts.pre_norm or config.moe.expert_output_init != "zero"
            _copy_into_experts(layer.experts, loaded[str(layer.layer_number)], copy_fc2, layer.layer_number)
            done.append((layer.layer_number, copy_fc2))
    return done


def _copy_into_experts(stack, source: dict, copy_fc2: bool, number: int) -> None:
    """Every local expert's every sublayer := the dense MLP in ``source`` (fc2 only if ``copy_fc2``);
    the per-expert norms := the dense layer's pre-MLP norm."""
    for sublayer in stack.sublayers:
        for name, param in sublayer.named_parameters():
            fc, kind = _expert_param(name)
            if fc is None or (fc == 2 and not copy_fc2):
                continue
            _copy(param, source.get(f"fc{fc}.{kind}"), f"layer {number} expert {name}")
    for norms in stack.norms or ():
        for expert in norms.local_experts:
            for kind, param in expert.norm.named_parameters():
                _copy(param, source.get(f"norm.{kind}"), f"layer {number} expert norm {kind}")


def _copy(param: torch.Tensor, value: Optional[torch.Tensor], what: str) -> None:
    if value is None or tuple(value.shape) != tuple(param.shape):
        got = "nothing" if value is None else f"shape {tuple(value.shape)}"
        raise ConfigError(f"--moe-use-upcycling: {what} {tuple(param.shape)} cannot copy the dense MLP "
                          f"({got}): the expert FFN must have the dense MLP's shape (--moe-expert-ffn-hidden-size "
                          f"unset or equal to --ffn-hidden-size, the same --add-bias-linear and --swiglu)")
    param.copy_(value.to(param.dtype))


def _expert_param(name: str) -> Tuple[Optional[int], Optional[str]]:
    """(1 or 2 for fc1/fc2, "weight"/"bias") of an expert module's parameter name, else (None, None)."""
    for pattern in _EXPERT_PARAM:
        match = pattern.fullmatch(name)
        if match:
            return int(match.group(1)), match.group(2)
    return None, None


def _summary(source: WeightsSource, plan: _Plan, upcycled) -> str:
    """One line for the log: what was loaded, upcycled, initialised here, left unused."""
    text = (f"{source.flag}: started from the weights of {source.describe()}, at iteration 0 with a fresh "
            f"optimizer and RNG ({len(plan.to_load)} tensors loaded")
    if upcycled:
        zero = [n for n, copied in upcycled if not copied]
        text += (f"; upcycled: every expert of MoE layer(s) {', '.join(str(n) for n, _ in upcycled)} copies the "
                 f"dense MLP of its layer" + (f" (fc2 zero, --moe-expert-output-init zero: layer(s) "
                                              f"{', '.join(map(str, zero))})" if zero else ""))
    if plan.fresh:
        text += f"; {'routers' if upcycled else 'MoE routers and experts'} initialised here"
    if plan.replaced and not upcycled:
        text += "; the dense MLPs the MoE layers replace are not used (--moe-use-upcycling would copy them)"
    return text + ")"
