"""The :class:`Trainer`: everything one rank's training holds, typed, built by :func:`.build.build`.

Components: the model and its megatron wrapper, the optimizers, the position in the run
(:class:`~stablemoe_megatron.checkpoint.format.TrainState`), the
:class:`~.stage.StageSchedule`, the data iterators, and the callbacks the loop calls after every
step and at the end (the routing probe). The loop in :mod:`.loop` reads top to bottom on it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from stablemoe_megatron.checkpoint import TrainState
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.training.stage import StageSchedule, switch_message
from stablemoe_megatron.training.step import StepContext


class Callback:
    """Something the loop calls: after each optimizer step and once after the last one."""

    def on_step_end(self, trainer: "Trainer", reporter) -> None:  # noqa: ARG002 - optional hook
        return None

    def on_train_end(self, trainer: "Trainer", reporter) -> None:  # noqa: ARG002 - optional hook
        return None

    def summary(self):
        """A short value for the iteration line / JSONL record, or None."""
        return None


@dataclass
class Trainer:
    config: RunConfig
    model: torch.nn.Module  # this rank's StableMoEGPTModel (unwrapped)
    ddp_model: torch.nn.Module  # megatron's DistributedDataParallel around it (the model itself when evaluating)
    state: TrainState  # iteration, consumed samples, stage, layout, tokenizer size (saved in checkpoints)
    tokenizer: object
    num_microbatches: int
    global_batch: int
    stage: StageSchedule
    optimizer: object = None  # megatron's optimizer; None when built for evaluation
    scheduler: object = None
    side_optimizer: object = None  # the distilled routers' optimizer (StableMoE stage 1 only)
    dp_group: object = None
    train_iterator: Optional[Callable] = None
    valid_iterator: Optional[Callable] = None
    test_iterator: Optional[Callable] = None
    signals: object = None  # signals.StopSignals
    callbacks: List[Callback] = field(default_factory=list)
    save_lock: object = None  # save_dir.SaveDirLock held by rank 0 while the run writes --save
    started_at: float = field(default_factory=time.monotonic)  # the job's start (pretrain sets it)

    # -- the step ---------------------------------------------------------------------------------
    def step_context(self) -> StepContext:
        c = self.config
        return StepContext(self.ddp_model, self.model, self.num_microbatches, c.training.micro_batch_size,
                           c.model.seq_length, self.global_batch, self.optimizer, self.scheduler,
                           self.side_optimizer, self.dp_group)

    def stop_requested(self) -> bool:
        """A stop signal (SIGUSR1 / SIGTERM) reached this rank, or --exit-duration-in-mins has passed."""
        return bool(self.signals is not None and self.signals.received) or self.duration_exceeded()

    def duration_exceeded(self) -> bool:
        """Megatron-LM's ``--exit-duration-in-mins``: minutes since the job started (this rank's clock;
        the loop's all-reduce of the stop flag lets the slowest rank decide for all)."""
        minutes = self.config.training.exit_duration_in_mins
        return bool(minutes) and (time.monotonic() - self.started_at) / 60.0 > minutes

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- the stage --------------------------------------------------------------------------------
    def enter_stage_two(self, reporter=None) -> None:
        """Freeze the distilled routers, drop their optimizer; logged once."""
        count = self.stage.enter_stage_two(self.model)
        self.side_optimizer = None
        self.state.stage = 2
        if reporter is not None:
            reporter.message(switch_message(self.state.iteration, count))

    # -- callbacks, saving, teardown --------------------------------------------------------------
    def run_callbacks(self, hook: str, reporter) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, reporter)

    def callback_summary(self):
        values = [c.summary() for c in self.callbacks if c.summary() is not None]
        return values[0] if values else None

    def save(self, reporter=None) -> None:
        from stablemoe_megatron.cli_args import dump_config
        from stablemoe_megatron.training.checkpointing import save_checkpoint

        config = self.config
        path = save_checkpoint(config.checkpoint.save, self.state, self.ddp_model, self.optimizer, self.scheduler,
                               self.side_optimizer, dump_config(config), config.checkpoint.keep_last)
        if reporter is not None:
            reporter.message(f"saved checkpoint {path} (stage {self.state.stage})")

    def release(self) -> None:
        """Give up the --save directory (end of the run, or a failure)."""
        if self.save_lock is not None:
            self.save_lock.release()
            self.save_lock = None

    def describe(self) -> str:
        from megatron.core import parallel_state as ps

        params = sum(p.numel() for p in self.model.parameters())
        c = self.config
        return (f"model stage params (this rank): {params:,} | layers {c.model.num_layers} hidden {c.model.hidden_size} "
                f"| MoE: {c.moe.router if c.moe.enabled else 'dense'}"
                f"{f' x{c.moe.num_experts}' if c.moe.enabled else ''} | TP {ps.get_tensor_model_parallel_world_size()} "
                f"PP {ps.get_pipeline_model_parallel_world_size()} EP {ps.get_expert_model_parallel_world_size()} "
                f"DP {ps.get_data_parallel_world_size()} | global batch {self.global_batch} "
                f"({self.num_microbatches} micro-batches of {c.training.micro_batch_size}) | "
                f"starting at iteration {self.state.iteration}, stage {self.state.stage}\n"
                f"{c.moe.layout_summary(c.model.num_layers)}")
