"""Optional token dropping for token-choice routers (Switch-style expert capacity).

With a capacity factor c, each expert processes at most ``ceil(T * c / N)`` of the T tokens that
chose it; :func:`capacity_keep_mask` keeps, per expert, the tokens with the highest priority
(usually the gate), ties broken in favour of the earlier token.

Overflow policy: an overflowing token skips its expert and keeps only its residual, i.e. the MoE
layer adds nothing for it (``h_out = h``), as in Switch Transformer and Megatron's token-drop
policy "probs". It is not re-routed to another expert. Without a capacity factor nothing is
dropped (StableMoE's and BASE's default: their experts take every token they are given).
"""
from __future__ import annotations

import math

import torch

from .common import rank_within_group


def expert_capacity_per_expert(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert may process: ``ceil(T * c / N)``.

    The quotient is rounded to 9 decimals before the ceiling so that float noise
    (``100 * 1.1 / 10 = 11.000000000000002``) does not add a slot.
    """
    if num_experts <= 0 or capacity_factor <= 0:
        raise ValueError(
            f"need num_experts > 0 and capacity_factor > 0, got {num_experts} and {capacity_factor}"
        )
    return math.ceil(round(num_tokens * capacity_factor / num_experts, 9))


def capacity_keep_mask(
    expert_ids: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which tokens fit in their expert's capacity.

    Args:
        expert_ids: LongTensor ``[T]``, each token's expert.
        priority: ``[T]`` real priority (e.g. the gate); higher is kept first. Detached.
        num_experts: N.
        capacity: maximum tokens per expert (>= 0).
    Returns:
        BoolTensor ``[T]``: True for kept tokens, False for overflow. Per expert, the kept
        tokens are the ``capacity`` highest-priority ones (ties: earlier token kept). No host sync.
    """
    rank = rank_within_group(expert_ids.reshape(-1), priority.reshape(-1), num_experts)
    return rank < capacity
