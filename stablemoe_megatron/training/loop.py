"""The training loop: megatron-core's schedules, one optimizer step per iteration, read top to bottom.

:func:`pretrain` is the whole job: checks (before any work), process groups, model, optimizers,
resume, data, then the loop with logging, validation, checkpoints and the StableMoE stage switch.
"""
from __future__ import annotations

import math
import os
import time
from functools import partial
from typing import Optional

import torch

from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import ConfigError, TrainingStopped
from stablemoe_megatron.training import setup
from stablemoe_megatron.training.checkpointing import TrainState, save_checkpoint
from stablemoe_megatron.training.reporting import Reporter, gather_moe_metrics
from stablemoe_megatron.training.signals import LauncherWatch, StopSignals


# -- one micro-batch -------------------------------------------------------------------------------
def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked mean of the per-token LM losses of one micro-batch."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"lm_loss": loss.detach().clone()}  # megatron divides `loss` in place afterwards


def forward_step(data_iterator, model):
    """megatron schedule callback: one micro-batch through the model (every pipeline stage)."""
    batch = next(data_iterator)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    host_tokens = batch["tokens"]
    tokens = host_tokens.to(device, non_blocking=True)
    output = model(tokens, batch["position_ids"].to(device, non_blocking=True), None,
                   labels=batch["labels"].to(device, non_blocking=True), host_token_ids=host_tokens)
    return output, partial(_loss_func, batch["loss_mask"].to(device, non_blocking=True))


def _mean_lm_loss(losses_reduced) -> Optional[torch.Tensor]:
    """Average LM loss over micro-batches (last stage) and over the data-parallel group."""
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True) or not losses_reduced:
        return None
    loss = torch.stack([entry["lm_loss"] for entry in losses_reduced]).mean().float()
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group(with_context_parallel=True))
    return loss / ps.get_data_parallel_world_size(with_context_parallel=True)


def _stop_flags(loss: Optional[torch.Tensor], signalled: bool) -> tuple:
    """(non-finite loss anywhere, preemption signal anywhere): one small all-reduce."""
    flags = torch.zeros(2, device=setup.device())
    if loss is not None and not torch.isfinite(loss).all():
        flags[0] = 1
    flags[1] = float(signalled)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


# -- one iteration ---------------------------------------------------------------------------------
def train_step(job: "setup.Job", train_iterator):
    """zero grads -> forward/backward over the global batch's micro-batches -> optimizer step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    job.ddp_model.zero_grad_buffer()
    job.optimizer.zero_grad()
    if job.side_optimizer is not None:
        job.side_optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=train_iterator, model=[job.ddp_model],
        num_microbatches=job.num_microbatches, seq_length=job.config.model.seq_length,
        micro_batch_size=job.config.training.micro_batch_size, forward_only=False)
    loss = _mean_lm_loss(losses)
    nonfinite, signalled = _stop_flags(loss, bool(job.preemption.received) if job.preemption else False)
    if nonfinite:
        return loss, None, nonfinite, signalled  # no update: the weights stay the last good ones
    _, grad_norm, _ = job.optimizer.step()
    if job.side_optimizer is not None:
        job.side_optimizer.step(job.current_lr())
    job.scheduler.step(increment=job.global_batch)
    job.model.finalize_moe_step(job.dp_group)
    return loss, grad_norm, nonfinite, signalled


@torch.no_grad()
def evaluate(job: "setup.Job", iterator_factory, eval_iters: int) -> Optional[float]:
    """Mean LM loss over ``eval_iters`` global batches (forward only); same value on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    job.ddp_model.eval()
    iterator = iterator_factory()
    totals = []
    for _ in range(eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator, model=[job.ddp_model],
            num_microbatches=job.num_microbatches, seq_length=job.config.model.seq_length,
            micro_batch_size=job.config.training.micro_batch_size, forward_only=True)
        loss = _mean_lm_loss(losses)
        if loss is not None:
            totals.append(loss)
    job.ddp_model.train()
    value = torch.stack(totals).mean() if totals else torch.zeros((), device=setup.device())
    # Broadcast from the last stage so every rank returns the same number.
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM,
                                 group=_last_stage_broadcast_group())
    return float(value)


def _last_stage_broadcast_group():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


# -- the job ---------------------------------------------------------------------------------------
def pretrain(config: RunConfig) -> dict:
    """Train as configured; return the final validation/test losses (on every rank)."""
    signals = StopSignals()  # installed first: a signal during start-up is not lost
    watch = LauncherWatch.start_if_launched()
    try:
        job = setup.prepare(config)
    except BaseException:
        _stop_watching(signals, watch)
        raise
    job.preemption = signals
    reporter = Reporter(config.logging.tensorboard_dir, config.logging.metrics_file, config.training.train_iters)
    try:
        reporter.message(job.describe())
        results = train_loop(job, reporter)
        if results["exited_early"]:
            return results  # preempted or --exit-interval: saved already; leave within the grace period
        if job.probe is not None:
            job.probe.finish(job, reporter)
        for split, factory in (("validation", job.valid_iterator), ("test", job.test_iterator)):
            if factory is not None and config.training.eval_iters > 0:
                loss = evaluate(job, factory, config.training.eval_iters)
                reporter.validation(split, job.state.iteration, loss)
                results[f"{split}_loss"] = loss
                results[f"{split}_ppl"] = math.exp(min(loss, 50.0))
        return results
    finally:
        reporter.close()
        job.release()
        _stop_watching(signals, watch)


def _stop_watching(signals: StopSignals, watch: Optional[LauncherWatch]) -> None:
    signals.restore()
    if watch is not None:
        watch.stop()


def train_loop(job: "setup.Job", reporter: Reporter) -> dict:
    config, state = job.config, job.state
    train_iterator = job.train_iterator()
    interval_start, interval_steps = time.perf_counter(), 0
    while state.iteration < config.training.train_iters:
        if job.stage_two_due():
            job.enter_stage_two(reporter)
        loss, grad_norm, nonfinite, signalled = train_step(job, train_iterator)
        if nonfinite:
            reporter.message(f"iteration {state.iteration + 1}: the loss is NaN or infinite; stopping "
                             f"without updating or saving (the last checkpoint is kept)")
            raise TrainingStopped("non-finite loss")
        state.iteration += 1
        state.consumed_train_samples += job.global_batch
        interval_steps += 1
        probe_start = time.perf_counter()
        job.probe_routing(reporter)
        interval_start += time.perf_counter() - probe_start  # probes are not training time
        if state.iteration % config.logging.log_interval == 0 or state.iteration == config.training.train_iters:
            elapsed = (time.perf_counter() - interval_start) / interval_steps
            _log_iteration(job, reporter, loss, grad_norm, elapsed, interval_steps)
            interval_start, interval_steps = time.perf_counter(), 0
        pause_start = time.perf_counter()
        if config.training.eval_interval and state.iteration % config.training.eval_interval == 0 \
                and job.valid_iterator is not None and state.iteration < config.training.train_iters:
            reporter.validation("validation", state.iteration,
                                evaluate(job, job.valid_iterator, config.training.eval_iters))
        if _should_save(config, state.iteration, signalled):
            job.save(reporter)
        interval_start += time.perf_counter() - pause_start  # neither are validation and saving
        if signalled or (config.training.exit_interval and state.iteration % config.training.exit_interval == 0):
            reporter.message(f"exiting at iteration {state.iteration} ({_exit_reason(job, signalled)})")
            return {"iteration": state.iteration, "exited_early": state.iteration < config.training.train_iters}
    if config.checkpoint.save and not _should_save(config, state.iteration, False):
        job.save(reporter)
    return {"iteration": state.iteration, "exited_early": False}


def _exit_reason(job, signalled: bool) -> str:
    """'signal' (with its name when this rank received it) or '--exit-interval'."""
    if not signalled:
        return "--exit-interval"
    name = job.preemption.received if job.preemption is not None else None
    return f"signal {name}" if name else "signal"


def _should_save(config: RunConfig, iteration: int, signalled: bool) -> bool:
    if not config.checkpoint.save:
        return False
    interval = config.checkpoint.save_interval
    return signalled or bool(interval and iteration % interval == 0) \
        or bool(config.training.exit_interval and iteration % config.training.exit_interval == 0)


def _log_iteration(job, reporter: Reporter, loss, grad_norm, elapsed: float, steps: int) -> None:
    moe = gather_moe_metrics(job.model, steps) if job.config.moe.enabled else {}  # collective: same on all ranks
    job.check_frozen()
    seq = job.config.model.seq_length
    record = {
        "iteration": job.state.iteration, "stage": job.model_stage(),
        "consumed_samples": job.state.consumed_train_samples,
        "lm_loss": float(loss) if loss is not None else float("nan"),
        "lr": job.current_lr(), "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "elapsed_ms": elapsed * 1000.0, "global_batch_size": job.global_batch,
        "tokens_per_sec": job.global_batch * seq / max(elapsed, 1e-9),
        "routing_changed": job.last_probe_summary(),
    }
    reporter.iteration(record, moe)
