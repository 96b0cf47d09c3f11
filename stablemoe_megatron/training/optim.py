"""Model wrapping and optimizers: megatron's DDP, optimizer and LR schedule, plus the distilled router's own.

The distilled routers (StableMoE's token-id routers of stages 1-2) are kept OUT of megatron's DDP and
optimizer from the start and trained in stage 1 by :class:`DistilledRouterOptimizer`, a plain
AdamW with the same hyper-parameters and learning-rate schedule. At the stage switch it is simply
discarded: the frozen parameters were never in megatron's optimizer, so no momentum, weight
decay or gradient-buffer traffic can touch them, and the megatron optimizer and its checkpoints
look the same before and after the switch. The router's gradient never mixes with the backbone's
(L_dis trains only D and E^), so it is clipped on its own with the same ``--clip-grad``.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

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


def wrap_model(model, transformer_config, run: RunConfig):
    """Float16Module (bf16) and megatron DDP around ``model`` (build inside hidden_from_megatron)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    module = Float16Module(transformer_config, model) if run.training.bf16 else model
    for router in model.distilled_routers():
        router.distilled.float()  # tiny; trained in fp32 by its own optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer, check_for_nan_in_grad=False)
    return DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=module)


def build_optimizer(run: RunConfig, ddp_model, global_batch: int):
    """megatron optimizer (Adam, decoupled weight decay, global-norm clipping) and LR scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = run.optimizer
    config = OptimizerConfig(
        optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, bf16=run.training.bf16,
        params_dtype=torch.bfloat16 if run.training.bf16 else torch.float32,
        use_distributed_optimizer=run.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    return optimizer, build_scheduler(run, optimizer, global_batch)


def build_scheduler(run: RunConfig, optimizer, global_batch: int):
    """megatron's LR schedule. Like Megatron-LM it counts SAMPLES (``step(increment=global_batch)``),
    so iteration counts are converted with the global batch size."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = run.optimizer
    warmup = opt.lr_warmup_iters * global_batch
    decay = max((opt.lr_decay_iters or run.training.train_iters) * global_batch, warmup + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay,
        wd_incr_steps=run.training.train_iters * global_batch, wd_incr_style="constant",
    )


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
    def step(self, lr: float) -> Optional[float]:
        """Average grads over DP, clip, update; return this optimizer's grad norm (or None)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return None
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
