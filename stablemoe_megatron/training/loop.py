"""The training loop, read top to bottom: build, then per iteration the stage switch, one step,
the callbacks (routing probe), logging, validation and checkpoints; at the end the final evaluations.

:func:`pretrain` is the whole job. The pieces live beside it: :mod:`.build` (checks, process
groups, model, optimizers, resume, data), :mod:`.step` (one optimizer step, evaluation),
:mod:`.stage` (the StableMoE stage schedule), :mod:`.probe` (the routing probe callback),
:mod:`.reporting` (log line, TensorBoard, JSONL), :mod:`.signals` (SIGUSR1/SIGTERM, launcher death).
"""
from __future__ import annotations

import math
import time
from typing import Optional

from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import TrainingStopped
from stablemoe_megatron.moe.block import bypass_moe_blocks
from stablemoe_megatron.training.build import build
from stablemoe_megatron.training.reporting import Reporter, gather_moe_metrics
from stablemoe_megatron.training.signals import LauncherWatch, StopSignals
from stablemoe_megatron.training.step import evaluate, train_step
from stablemoe_megatron.training.trainer import Trainer


def pretrain(config: RunConfig) -> dict:
    """Train as configured; return the final validation/test losses (on every rank)."""
    started_at = time.monotonic()  # --exit-duration-in-mins counts from here, as Megatron-LM's start time
    signals = StopSignals()  # installed first: a signal during start-up is not lost
    watch = LauncherWatch.start_if_launched()
    try:
        trainer = build(config, "train")
    except BaseException:
        _stop_watching(signals, watch)
        raise
    trainer.signals, trainer.started_at = signals, started_at
    reporter = Reporter(config.logging.tensorboard_dir, config.logging.metrics_file, config.training.train_iters)
    try:
        reporter.message(trainer.describe())
        results = train_loop(trainer, reporter)
        if results["exited_early"]:
            return results  # preempted, --exit-interval or --exit-duration-in-mins: saved already
        trainer.run_callbacks("on_train_end", reporter)
        for split, factory in (("validation", trainer.valid_iterator), ("test", trainer.test_iterator)):
            if factory is not None and config.training.eval_iters > 0:
                loss = _evaluate_split(trainer, reporter, split, factory)
                results[f"{split}_loss"] = loss
                results[f"{split}_ppl"] = math.exp(min(loss, 50.0))
        return results
    finally:
        reporter.close()
        trainer.release()
        _stop_watching(signals, watch)


def _stop_watching(signals: StopSignals, watch: Optional[LauncherWatch]) -> None:
    signals.restore()
    if watch is not None:
        watch.stop()


def train_loop(trainer: Trainer, reporter: Reporter) -> dict:
    """Steps until ``--train-iters`` (or a stop signal / ``--exit-interval``); returns where it ended."""
    config, state = trainer.config, trainer.state
    train_iterator = trainer.train_iterator()
    interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
    while state.iteration < config.training.train_iters:
        if trainer.stage.due(state.iteration):
            trainer.enter_stage_two(reporter)
        trainer.model.start_moe_step(state.iteration)
        step = train_step(trainer.step_context(), train_iterator, trainer.stop_requested)
        loss, grad_norm, nonfinite, signalled = step[:4]
        skipped += step.skipped  # inf/nan gradients under loss scaling: megatron did not update (--fp16)
        if nonfinite:
            reporter.message(f"iteration {state.iteration + 1}: the loss is NaN or infinite; stopping "
                             f"without updating or saving (the last checkpoint is kept)")
            raise TrainingStopped("non-finite loss")
        state.iteration += 1
        state.consumed_train_samples += trainer.global_batch
        interval_steps += 1
        callbacks_start = time.perf_counter()
        trainer.run_callbacks("on_step_end", reporter)
        interval_start += time.perf_counter() - callbacks_start  # probes are not training time
        if state.iteration % config.logging.log_interval == 0 or state.iteration == config.training.train_iters:
            elapsed = (time.perf_counter() - interval_start) / interval_steps
            _log_iteration(trainer, reporter, loss, grad_norm, elapsed, interval_steps, skipped)
            interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
        pause_start = time.perf_counter()
        _validate_and_save(trainer, reporter, signalled)
        interval_start += time.perf_counter() - pause_start  # neither are validation and saving
        if signalled or (config.training.exit_interval and state.iteration % config.training.exit_interval == 0):
            reporter.message(f"exiting at iteration {state.iteration} ({_exit_reason(trainer, signalled)})")
            return {"iteration": state.iteration, "exited_early": state.iteration < config.training.train_iters}
    if config.checkpoint.save and not _should_save(config, state.iteration, False):
        trainer.save(reporter)
    return {"iteration": state.iteration, "exited_early": False}


def _validate_and_save(trainer: Trainer, reporter: Reporter, signalled: bool) -> None:
    """Validation every ``--eval-interval`` (not at the end: the final one follows), then a checkpoint when due."""
    config, iteration = trainer.config, trainer.state.iteration
    if config.training.eval_interval and iteration % config.training.eval_interval == 0 \
            and trainer.valid_iterator is not None and iteration < config.training.train_iters:
        _evaluate_split(trainer, reporter, "validation", trainer.valid_iterator)
    if _should_save(config, iteration, signalled):
        trainer.save(reporter)


def _evaluate_split(trainer: Trainer, reporter: Reporter, split: str, iterator_factory) -> float:
    """Evaluate and report one split; with ``--eval-moe-bypass`` the validation split is evaluated
    again with every MoE block skipped (reported as ``validation_moe_bypassed``)."""
    config, iteration = trainer.config, trainer.state.iteration
    loss = evaluate(trainer.step_context(), iterator_factory, config.training.eval_iters)
    reporter.validation(split, iteration, loss)
    if config.logging.eval_moe_bypass and split == "validation":
        with bypass_moe_blocks([trainer.model]):
            bypassed = evaluate(trainer.step_context(), iterator_factory, config.training.eval_iters)
        reporter.validation(f"{split}_moe_bypassed", iteration, bypassed)
    return loss


def _exit_reason(trainer: Trainer, signalled: bool) -> str:
    """'signal' (with its name when this rank received it), '--exit-duration-in-mins' or '--exit-interval'."""
    if not signalled:
        return "--exit-interval"
    name = trainer.signals.received if trainer.signals is not None else None
    if name:
        return f"signal {name}"
    if trainer.config.training.exit_duration_in_mins:
        return f"--exit-duration-in-mins {trainer.config.training.exit_duration_in_mins:g} reached"
    return "signal"


def _should_save(config: RunConfig, iteration: int, signalled: bool) -> bool:
    if not config.checkpoint.save:
        return False
    interval = config.checkpoint.save_interval
    return signalled or bool(interval and iteration % interval == 0) \
        or bool(config.training.exit_interval and iteration % config.training.exit_interval == 0)


def _log_iteration(trainer: Trainer, reporter: Reporter, loss, grad_norm, elapsed: float, steps: int,
                   skipped: int = 0) -> None:
    """The interval's record; like Megatron-LM's line it has the current loss scale and the number of
    skipped iterations (inf/nan gradients) since the last line."""
    moe = gather_moe_metrics(trainer.model, steps) if trainer.config.moe.enabled else {}  # collective
    trainer.stage.check_frozen(trainer.model)
    seq = trainer.config.model.tokens_per_sample
    record = {
        "iteration": trainer.state.iteration, "stage": trainer.state.stage,
        "consumed_samples": trainer.state.consumed_train_samples,
        "lm_loss": float(loss) if loss is not None else float("nan"),
        "lr": trainer.current_lr(), "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "elapsed_ms": elapsed * 1000.0, "global_batch_size": trainer.global_batch,
        "tokens_per_sec": trainer.global_batch * seq / max(elapsed, 1e-9),
        "routing_changed": trainer.callback_summary(),
        "loss_scale": float(trainer.optimizer.get_loss_scale()), "skipped_iterations": skipped,
    }
    reporter.iteration(record, moe)
