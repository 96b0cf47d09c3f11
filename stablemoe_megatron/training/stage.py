"""The StableMoE stage schedule: when stage 2 starts, what the switch freezes, and the frozen check.

Stage 1 trains the backbone router with the balance loss and distils its choices into a small
token-id router (the distilled router, with its own optimizer). At ``--moe-stage2-start-iter`` the
distilled routers are frozen (``requires_grad=False``, their optimizer dropped: they were never in
megatron's optimizer), and from then on route every token by its id alone. "Frozen means frozen":
:meth:`StageSchedule.check_frozen` compares the parameters with a snapshot taken at the switch.

``stage`` is the one name for this everywhere: ``StageSchedule.stage``, the model's
``stage`` property, ``TrainState.stage`` in checkpoints. A resumed run enters stage 2 when the
checkpoint was saved in it, or when its iteration is already past the start.
"""
from __future__ import annotations

from typing import List, Optional

import torch


class StageSchedule:
    """Stage of the run (1 or 2) and the switch between them."""

    def __init__(self, start_iter: Optional[int]):
        self.start_iter = start_iter
        self.stage = 1
        self._snapshot: List[torch.Tensor] = []

    def due(self, iteration: int) -> bool:
        """Stage 2 should begin before the step that follows ``iteration``."""
        return self.stage == 1 and self.start_iter is not None and iteration >= self.start_iter

    def enter_stage_two(self, model) -> int:
        """Freeze ``model``'s distilled routers and snapshot them; returns their parameter count
        (the maximum over ranks: a pipeline stage without MoE layers holds none). Collective."""
        from stablemoe_megatron.training.optim import distilled_parameters
        from stablemoe_megatron.training.step import device

        count = torch.tensor(float(sum(p.numel() for p in distilled_parameters(model))), device=device())
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        model.enter_stage_two()
        self.stage = 2
        self._snapshot = [p.detach().clone() for p in _frozen_parameters(model)]
        return int(count)

    def resume(self, model, saved_stage: int, iteration: int) -> bool:
        """After loading the weights: enter stage 2 if the checkpoint is in it or past the start."""
        if saved_stage == 2 or self.due(iteration):
            self.enter_stage_two(model)
            return True
        return False

    def check_frozen(self, model) -> None:
        """Raise if a frozen distilled-router parameter ever changed or became trainable (a bug)."""
        for before, param in zip(self._snapshot, _frozen_parameters(model)):
            if param.requires_grad or not torch.equal(before, param.detach()):
                raise RuntimeError("a frozen distilled-router parameter changed in stage 2 (a bug)")

    @property
    def frozen_snapshot(self) -> List[torch.Tensor]:
        return self._snapshot


def _frozen_parameters(model) -> List[torch.nn.Parameter]:
    return [p for router in model.distilled_routers() for p in router.distilled.parameters()]


def switch_message(iteration: int, count: int) -> str:
    return (f"stage switch at iteration {iteration}: distilled routers frozen ({count} parameters per pipeline "
            f"stage holding MoE layers, never in megatron's optimizer, their own optimizer dropped); "
            f"balance and distillation losses off; routing is now a function of the token id")
