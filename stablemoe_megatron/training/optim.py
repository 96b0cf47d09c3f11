"""Model wrapping and optimizers: megatron's DDP, optimizer and LR schedule, plus the distilled router's own.

The distilled routers (StableMoE's token-id routers of stages 1-2) are kept OUT of megatron's DDP and
optimizer from the start and trained in stage 1 by :class:`DistilledRouterOptimizer`, a plain
AdamW with the same hyper-parameters and learning-rate schedule. At the stage switch it is simply
discarded: the frozen parameters were never in megatron's optimizer, so no momentum, weight
decay or gradient-buffer traffic can touch them, and the megatron optimizer and its checkpoints
look the same before and after the switch. The router's gradient never mixes with the backbone's
(L_dis trains only D and E^), so it is clipped on its own with the same ``--clip-grad``.

Mixed precision (``--bf16`` / ``--fp16``) is megatron's: :func:`half_precision` wraps the model in
``Float16Module`` (half weights and activations), DDP reduces gradients in fp32, and megatron's
optimizer keeps fp32 main weights (``Float16OptimizerWithFloat16Params`` or the distributed
optimizer) with a loss scaler under ``--fp16`` (``DynamicGradScaler``, or ``ConstantGradScaler``
with ``--loss-scale``). :func:`optimizer_step` is megatron's step, with the scalers of its
dense and expert sub-optimizers kept in lockstep.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from stablemoe_megatron.config import RunConfig


def distilled_parameters(model) -> List[torch.nn.Parameter]:
    """Parameters of every distilled router of this pipeline stage (unwrapped model)."""
    return [p for router in model.distilled_routers() for p in router.distilled.parameters()]


@contextlib.contextmanager
def hidden_from_megatron(params: List[torch.nn.Parameter]):
    """Within the block the parameters look frozen, so megatron's DDP and optimizer skip them."""
    wanted = [p.requires_grad for p in params]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, requires_grad in zip(params, wanted):
            param.requires_grad_(requires_grad)


def half_precision(model, transformer_config, run: RunConfig):
    """``model`` in megatron's Float16Module under ``--bf16`` / ``--fp16``, else ``model`` itself.

    Float16Module casts every floating parameter and buffer to bf16/fp16, the first pipeline
    stage's inputs to it and the last stage's outputs back to fp32. Cast back to fp32 afterwards,
    as megatron's TopKRouter keeps its ``expert_bias`` buffer: the distilled routers (tiny, trained
    in fp32 by their own optimizer) and the routers' floating buffers (Expert Choice's evaluation
    thresholds, an average of probabilities). Router weights stay half like every megatron weight
    (fp32 main copies in megatron's optimizer); the routing functions compute scores, gates and
    losses in fp32 from half inputs.
    """
    from megatron.core.transformer.module import Float16Module

    module = Float16Module(transformer_config, model) if run.training.bf16 or run.training.fp16 else model
    for layer in model.moe_layers:
        for buffer in layer.router.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.data.float()
    for router in model.distilled_routers():
        router.distilled.float()
    return module


def wrap_model(model, transformer_config, run: RunConfig):
    """:func:`half_precision` and megatron DDP around ``model`` (build inside hidden_from_megatron).
    Gradients are accumulated and all-reduced in fp32 whatever the precision."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    module = half_precision(model, transformer_config, run)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=run.megatron.overlap_grad_reduce,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer, check_for_nan_in_grad=False)
    return DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=module)


def build_optimizer(run: RunConfig, ddp_model, global_batch: int):
    """megatron optimizer (Adam, decoupled weight decay, global-norm clipping) and LR scheduler.

    The precision settings go to megatron's OptimizerConfig, which picks the optimizer (fp32 main
    weights for bf16/fp16) and the loss scaler; the schedules scale the loss (and the MoE auxiliary
    losses) with ``grad_scale_func``, set here as Megatron-LM's ``train`` sets it.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt, training = run.optimizer, run.training
    config = OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, bf16=training.bf16, fp16=training.fp16,
        params_dtype=torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32,
        loss_scale=training.loss_scale, initial_loss_scale=training.initial_loss_scale,
        min_loss_scale=training.min_loss_scale, loss_scale_window=training.loss_scale_window,
        hysteresis=training.hysteresis,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    use_fused_adam_on_cpu(optimizer)
    ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer, build_scheduler(run, optimizer, global_batch)


def use_fused_adam_on_cpu(optimizer) -> int:
    """Switch the torch Adam(W) inside megatron's optimizer to torch's fused kernel where all its
    parameters are on the CPU; returns how many optimizers were switched.

    Without transformer-engine or apex, megatron-core builds ``torch.optim.AdamW`` with torch's
    defaults, which on the CPU is the per-tensor loop (``foreach`` is a CUDA default). The fused CPU
    kernel computes the same update (to rounding) about 4x faster: 14.6 M parameters took 6.4 ms
    instead of 25.5 ms on 2 cores, and an MoE model holds several times the parameters of a dense
    model of equal FLOPs. GPU parameters keep what megatron chose (fused TE / apex Adam, or torch's
    foreach). Set before the first step; a checkpoint stores the groups' ``fused`` flag with them.
    """
    switched = 0
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if params and all(p.device.type == "cpu" and p.is_floating_point() for p in params):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
            switched += 1
    return switched


def loss_scalers(optimizer) -> list:
    """The loss scalers of megatron's optimizer: one per sub-optimizer (dense, expert) that has one."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [part.grad_scaler for part in parts if getattr(part, "grad_scaler", None) is not None]


def optimizer_step(optimizer) -> Tuple[bool, Optional[float], float]:
    """megatron's optimizer step: (updated, grad norm, the loss scale of this step's gradients).

    ``updated`` is False when megatron skipped the step: inf/nan gradients under loss scaling;
    weights and optimizer state are untouched and the dynamic scaler counts the step towards
    ``--hysteresis``. megatron's ChainedOptimizer gives the dense and the expert parameters an
    optimizer and a DynamicGradScaler each, and each scaler sees only its own parameters' inf/nan,
    while the loss is scaled by the first one's: an overflow in expert gradients alone would back
    off the expert scaler only, and its gradients would be unscaled by the wrong factor from then
    on. So every scaler is updated with the step's outcome (its state before the step restored,
    then megatron's own ``update``), which keeps them equal.
    """
    scalers = loss_scalers(optimizer)
    scale = float(optimizer.get_loss_scale()) if scalers else 1.0  # (a device sync only with a scaler)
    before = [scaler.state_dict() for scaler in scalers]
    updated, grad_norm, _ = optimizer.step()
    if len(scalers) > 1:
        for scaler, state in zip(scalers, before):
            scaler.load_state_dict(state)
            scaler.update(not updated)
    return bool(updated), grad_norm, scale


def build_scheduler(run: RunConfig, optimizer, global_batch: int):
    """megatron's LR schedule. Like Megatron-LM it counts SAMPLES (``step(increment=global_batch)``),
    so iteration counts are converted with the global batch size."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = run.optimizer
    warmup, decay = schedule_lengths(run, global_batch)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=run.training.train_iters * global_batch, wd_incr_style="constant",
    )


def schedule_lengths(run: RunConfig, global_batch: int):
    """(warm-up, decay) lengths in samples, as Megatron-LM derives them: the decay from
    --lr-decay-samples / --lr-decay-iters (default: the whole run, --train-samples or --train-iters);
    the warm-up a --lr-warmup-fraction of the decay, or --lr-warmup-samples / --lr-warmup-iters."""
    opt, training = run.optimizer, run.training
    if opt.lr_decay_samples is not None:
        decay = opt.lr_decay_samples
    elif opt.lr_decay_iters is not None:
        decay = opt.lr_decay_iters * global_batch
    else:
        decay = training.train_samples or training.train_iters * global_batch
    if opt.lr_warmup_fraction is not None:
        warmup = int(opt.lr_warmup_fraction * decay)
    else:
        warmup = opt.lr_warmup_samples or opt.lr_warmup_iters * global_batch
    return warmup, max(decay, warmup + 1)


class DistilledRouterOptimizer:
    """AdamW for the distilled routers during stage 1 (see module docstring).

    ``step`` averages the gradients over the data-parallel group (megatron's finalize step has
    already summed them over TP for sequence-parallel shards) and follows the backbone's current
    learning rate. Its state is checkpointed as ShardedTensors keyed like the parameters, so it
    survives any pipeline layout; Adam's step count equals the iteration and is not stored.
    """

    def __init__(self, params: List[torch.nn.Parameter], run: RunConfig, dp_group=None):
        self.params = list(params)
        self.dp_group = dp_group
        self.clip_grad = run.optimizer.clip_grad
        opt = run.optimizer
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": opt.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups or [{"params": []}], lr=opt.lr,
                                           betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> Optional[float]:
        """Unscale (the loss scale of this step, ``--fp16``), average grads over DP, clip, update;
        return this optimizer's grad norm (or None)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return None
        if grad_scale != 1.0:  # the distillation loss is scaled with the others (MoEAuxLossAutoScaler)
            for grad in grads:
                grad.div_(grad_scale)
        if self.dp_group is not None and self.dp_group.size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, group=self.dp_group)
            flat /= self.dp_group.size()
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad if self.clip_grad > 0 else float("inf"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return float(norm)

    def sharded_state_dict(self, model_sharded_state_dict) -> dict:
        """{'exp_avg'/'exp_avg_sq': ShardedTensors keyed 'distilled_optimizer.<param key>'}."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
        )

        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.params)
        out = {}
        for index, param in enumerate(self.params):
            state = self.optimizer.state.get(param) or self._fresh_state(param)
            for name in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{index}"] = make_sharded_optimizer_tensor(
                    id_map[index], state[name], prefix=f"distilled_optimizer.{name}")
        return out

    def load_state_dict(self, loaded: dict, iteration: int) -> None:
        for index, param in enumerate(self.params):
            self.optimizer.state[param] = {
                "step": torch.tensor(float(iteration)),
                "exp_avg": loaded[f"exp_avg.{index}"].to(param.device),
                "exp_avg_sq": loaded[f"exp_avg_sq.{index}"].to(param.device),
            }

    @staticmethod
    def _fresh_state(param) -> dict:
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


# -- megatron's optimizer state in checkpoints (used by training/checkpointing.py) -------------------------
# megatron-core 0.16's DistributedOptimizer with torch's Adam (no apex / transformer-engine: the CPU
# install, and a GPU install without them) cannot save or reload its state as shipped; the three
# functions below work around it from the outside, leaving megatron's own code paths in place.
_STEP_ENTRY = "adam_step_of_an_optimizer_without_parameters_here"


def optimizer_parts(optimizer) -> list:
    """megatron's sub-optimizers (dense, expert) of a ChainedOptimizer, or the optimizer itself."""
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


@contextlib.contextmanager
def step_placeholders(optimizer):
    """Within the block, a distributed sub-optimizer without Adam state on this rank (no
    parameters here: the expert optimizer of a pipeline stage without MoE layers) holds one
    entry with the others' step, keyed by a string, not a parameter.

    megatron 0.16's ``DistributedOptimizer.state_dict()`` with torch's Adam asserts that the
    per-parameter states hold exactly one step value, so it fails on such a rank (apex / TE fused
    Adam keep the step in the parameter groups and need no entry).
    """
    from megatron.core.optimizer import distrib_optimizer

    parts = [part for part in optimizer_parts(optimizer)
             if isinstance(part, distrib_optimizer.DistributedOptimizer) and not part.is_stub_optimizer]
    empty = [part for part in parts if len(part.optimizer.state) == 0]
    if distrib_optimizer.HAVE_APEX_OR_TE or not empty:
        yield
        return
    steps = [s["step"] for part in parts for s in part.optimizer.state.values() if "step" in s]
    for part in empty:
        part.optimizer.state[_STEP_ENTRY] = {"step": steps[0].clone() if steps else torch.zeros(())}
    try:
        yield
    finally:
        for part in empty:
            part.optimizer.state.pop(_STEP_ENTRY, None)


def allocate_adam_state(optimizer) -> None:
    """Zero moments and a zero step for each distributed optimizer that has not stepped yet.

    megatron's ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` reads every
    parameter's Adam ``step``, which torch's Adam creates only at its first step (megatron's
    ``init_state_fn`` allocates the moments alone; apex / TE fused Adam keep the step in the
    parameter groups, so it is added only for torch's Adam).
    """
    from megatron.core.optimizer import distrib_optimizer

    for part in optimizer_parts(optimizer):
        if not isinstance(part, distrib_optimizer.DistributedOptimizer) or part.is_stub_optimizer:
            continue
        if len(part.optimizer.state) == 0 and part.init_state_fn is not None:
            part.init_state_fn(part.optimizer, part.config)
            if not distrib_optimizer.HAVE_APEX_OR_TE:
                for state in part.optimizer.state.values():
                    state.setdefault("step", torch.zeros((), dtype=torch.float32))


def load_optimizer_state(optimizer, state_dict) -> None:
    """megatron's ``optimizer.load_state_dict``, sub-optimizer by sub-optimizer as its
    ChainedOptimizer does; a distributed one with torch's Adam loads its parameter state with the
    per-parameter ``step`` set aside, then given back one tensor per parameter. megatron 0.16's
    ``_set_main_param_and_optimizer_states`` copies every entry of the Adam state from the loaded
    tensors, which never hold the step, and its ``load_state_dict`` hands every parameter the
    SAME step tensor, which torch's Adam then increments once per parameter (apex / TE fused Adam
    keep the step in the parameter groups)."""
    from megatron.core.optimizer import distrib_optimizer

    parts = optimizer_parts(optimizer)
    states = [state_dict] if len(parts) == 1 else [v for _, v in sorted(state_dict.items())] \
        if isinstance(state_dict, dict) else list(state_dict)
    if distrib_optimizer.HAVE_APEX_OR_TE or len(parts) != len(states):
        optimizer.load_state_dict(state_dict)  # megatron's own path (and its message on a mismatch)
        return
    for part, state in zip(parts, states):
        if not isinstance(part, distrib_optimizer.DistributedOptimizer) or "param_state" not in state \
                or state.get("param_state_sharding_type") != "fully_reshardable":
            part.load_state_dict(state)
            continue
        common = {k: v for k, v in state.items() if k not in ("param_state", "param_state_sharding_type")}
        part.load_state_dict(common)  # groups, step, loss scaler; allocates the Adam state
        steps = {param: s.pop("step") for param, s in part.optimizer.state.items() if "step" in s}
        try:
            part.load_parameter_state_from_fully_reshardable(state["param_state"])
        finally:
            for param, step in steps.items():
                part.optimizer.state[param]["step"] = step.clone()
