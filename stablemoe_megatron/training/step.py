"""One training step and one evaluation pass, on megatron-core's pipeline schedules.

:func:`forward_step` is the schedule's callback (one micro-batch through this rank's pipeline
stage, handing the token ids to the MoE layers); :func:`train_step` is zero grads -> forward and
backward over the global batch's micro-batches -> optimizer steps; :func:`evaluate` is the
forward-only mean LM loss over a number of global batches. They need only a :class:`StepContext`
(the model and the optimizers), so training, evaluation and the benchmarks share them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch


def device() -> torch.device:
    """The accelerator of this rank, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class StepContext:
    """What a step needs: the megatron-wrapped model (DDP, or the bare model for evaluation),
    the model inside it (for the MoE hooks), the optimizers and the batch geometry."""

    wrapped_model: torch.nn.Module
    model: torch.nn.Module
    num_microbatches: int
    micro_batch_size: int
    seq_length: int
    global_batch: int
    optimizer: object = None  # megatron's optimizer (None: evaluation only)
    scheduler: object = None  # megatron's OptimizerParamScheduler
    side_optimizer: object = None  # the distilled routers' own optimizer in StableMoE stage 1
    dp_group: object = None

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked mean of the per-token LM losses of one micro-batch."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"lm_loss": loss.detach().clone()}  # megatron divides `loss` in place afterwards


def forward_step(data_iterator, model):
    """megatron schedule callback: one micro-batch through the model (every pipeline stage)."""
    batch = next(data_iterator)
    here = device()
    if "source" in batch:  # parallel text (the encoder-decoder model)
        return _translation_forward(batch, model, here)
    host_tokens = batch["tokens"]
    tokens = host_tokens.to(here, non_blocking=True)
    output = model(tokens, batch["position_ids"].to(here, non_blocking=True), None,
                   labels=batch["labels"].to(here, non_blocking=True), host_token_ids=host_tokens)
    return output, partial(_loss_func, batch["loss_mask"].to(here, non_blocking=True))


def _translation_forward(batch, model, here):
    """One parallel-text micro-batch (:mod:`stablemoe_megatron.parallel_text`) through the
    encoder-decoder model: per-token loss [B, T], masked mean over the target tokens."""
    source, target = batch["source"], batch["target_input"]
    output = model(source.to(here, non_blocking=True), target.to(here, non_blocking=True),
                   batch["source_padding"].to(here, non_blocking=True),
                   labels=batch["labels"].to(here, non_blocking=True),
                   host_source_ids=source, host_target_ids=target)
    return output, partial(_loss_func, batch["loss_mask"].to(here, non_blocking=True))


def mean_lm_loss(losses_reduced) -> Optional[torch.Tensor]:
    """Average LM loss over micro-batches (last stage) and over the data-parallel group."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True) or not losses_reduced:
        return None
    loss = torch.stack([entry["lm_loss"] for entry in losses_reduced]).mean().float()
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group(with_context_parallel=True))
    return loss / ps.get_data_parallel_world_size(with_context_parallel=True)


def stop_flags(loss: Optional[torch.Tensor], signalled: bool) -> tuple:
    """(non-finite loss anywhere, stop signal anywhere): one small all-reduce."""
    flags = torch.zeros(2, device=device())
    if loss is not None and not torch.isfinite(loss).all():
        flags[0] = 1
    flags[1] = float(signalled)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def _schedule(ctx: StepContext, iterator, forward_only: bool, seq_length: Optional[int] = None):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterator, model=[ctx.wrapped_model],
        num_microbatches=ctx.num_microbatches, seq_length=seq_length or ctx.seq_length,
        micro_batch_size=ctx.micro_batch_size, forward_only=forward_only)


class StepResult(NamedTuple):
    """What :func:`train_step` reports (the same on every rank, except ``loss``: last stage only)."""

    loss: Optional[torch.Tensor]  # mean LM loss over the global batch (None off the last pipeline stage)
    grad_norm: Optional[float]  # None when nothing was updated
    nonfinite: bool  # the loss is NaN/inf somewhere: nothing was updated
    signalled: bool  # a stop signal reached some rank
    skipped: bool = False  # megatron skipped the update: inf/nan gradients under loss scaling (--fp16)
    loss_scale: float = 1.0  # the loss scale of this step's gradients (1 without loss scaling)


def train_step(ctx: StepContext, train_iterator, stop_requested: Callable[[], bool] = lambda: False) -> StepResult:
    """zero grads -> forward/backward over the micro-batches -> optimizer steps.

    On a non-finite loss nothing is updated, so the weights stay the last good ones. On inf/nan
    gradients under loss scaling megatron skips the update, as Megatron-LM does (no weight, optimizer,
    distilled-router or learning-rate step; the dynamic scaler counts it), and the iteration counts.
    """
    from stablemoe_megatron.training.optim import optimizer_step

    ctx.wrapped_model.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    if ctx.side_optimizer is not None:
        ctx.side_optimizer.zero_grad()
    loss = mean_lm_loss(_schedule(ctx, train_iterator, forward_only=False))
    nonfinite, signalled = stop_flags(loss, stop_requested())  # read after the step: a late signal counts
    if nonfinite:
        return StepResult(loss, None, nonfinite, signalled)
    updated, grad_norm, loss_scale = optimizer_step(ctx.optimizer)
    if updated:
        if ctx.side_optimizer is not None:
            ctx.side_optimizer.step(ctx.current_lr(), grad_scale=loss_scale)
        ctx.scheduler.step(increment=ctx.global_batch)
    ctx.model.finalize_moe_step(ctx.dp_group)
    return StepResult(loss, grad_norm if updated else None, nonfinite, signalled, not updated, loss_scale)


@torch.no_grad()
def evaluate(ctx: StepContext, iterator_factory: Callable, eval_iters: int) -> float:
    """Mean LM loss over ``eval_iters`` global batches (forward only); the same value on every rank."""
    from megatron.core import parallel_state as ps

    was_training = ctx.wrapped_model.training
    ctx.wrapped_model.eval()
    iterator = iterator_factory()
    totals = []
    for _ in range(eval_iters):
        loss = mean_lm_loss(_schedule(ctx, iterator, forward_only=True))
        if loss is not None:
            totals.append(loss)
    ctx.wrapped_model.train(was_training)
    value = torch.stack(totals).mean() if totals else torch.zeros((), device=device())
    # Only the last pipeline stage holds the loss: a sum over the pipeline group gives it to every rank.
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM,
                                 group=ps.get_pipeline_model_parallel_group())
    return float(value)
