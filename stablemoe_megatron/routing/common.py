"""Helpers shared by the routing algorithms: expert counts, the counting set, ranking within groups.

The "counting set" is the token set over which per-expert counts ``n_i`` and the token count ``T``
of a loss are meant. A caller may pass totals reduced over several ranks; when it passes none, the
local tensors are the counting set. Losses divide by the counting-set size, so losses computed on
a partition of the tokens with the global counts passed in sum to the loss on all tokens.
"""
from __future__ import annotations

import torch


def tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of tokens routed to each expert.

    Args:
        expert_ids: LongTensor ``[T]`` with values in ``[0, num_experts)``.
        num_experts: N.
    Returns:
        LongTensor ``[N]`` on ``expert_ids.device``; sums to T.

    A scatter-add, not ``torch.bincount``: CUDA's bincount reads the ids' min and max back to the
    host to size its output (two device syncs per call, i.e. per MoE layer and micro-batch).
    """
    flat = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (router math is done in >= fp32)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def counting_set(
    expert_ids: torch.Tensor,
    num_experts: int,
    tokens_per_expert_total: torch.Tensor | None,
    num_tokens: int | torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resolve the counting set into detached float tensors on ``expert_ids.device``.

    Args:
        expert_ids: LongTensor ``[T]`` of the local tokens (used only when counts are not given).
        num_experts: N.
        tokens_per_expert_total: ``[N]`` counts over the counting set, or None for local counts.
        num_tokens: counting-set size, or None: the sum of the given counts, else the local T.
        dtype: float dtype of the results.
    Returns:
        ``(counts [N], num_tokens [])``, both detached. ``num_tokens`` is clamped to >= 1 so an
        empty batch gives a zero loss instead of NaN.
    """
    device = expert_ids.device
    if tokens_per_expert_total is None:
        counts = tokens_per_expert(expert_ids, num_experts)
    else:
        counts = tokens_per_expert_total
    counts = counts.detach().to(device=device, dtype=dtype)
    if num_tokens is None:
        total = counts.sum() if tokens_per_expert_total is not None else expert_ids.numel()
    else:
        total = num_tokens
    return counts, as_token_count(total, device, dtype)


def as_token_count(
    num_tokens: int | torch.Tensor | None, device: torch.device, dtype: torch.dtype, default: int = 0
) -> torch.Tensor:
    """``num_tokens`` (int, tensor, or None -> ``default``) as a detached 0-d tensor, clamped to >= 1.

    A Python number is created directly on ``device`` (a fill, no host-to-device copy, which
    would synchronise the stream); a tensor is moved only if it lives elsewhere.
    """
    if num_tokens is None:
        num_tokens = default
    if isinstance(num_tokens, torch.Tensor):
        total = num_tokens.detach().to(device=device, dtype=dtype).reshape(())
    else:
        total = torch.full((), float(num_tokens), device=device, dtype=dtype)
    return total.clamp_min(1)


def rank_within_group(group_ids: torch.Tensor, keys: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rank of every element among the elements of its group, by descending key.

    Rank 0 is the largest key of the group; equal keys are ranked by position (earlier first).
    Two stable sorts, no host sync.

    Args:
        group_ids: LongTensor ``[M]`` with values in ``[0, num_groups)``.
        keys: ``[M]`` sort keys (any real dtype; detached).
        num_groups: number of groups G.
    Returns:
        LongTensor ``[M]``: the rank of each element within its group.
    """
    order = torch.sort(keys.detach(), descending=True, stable=True).indices
    order = order[torch.sort(group_ids[order], stable=True).indices]
    group_sizes = tokens_per_expert(group_ids, num_groups)  # no device sync
    group_starts = torch.cumsum(group_sizes, 0) - group_sizes
    sorted_groups = group_ids[order]
    positions = torch.arange(order.numel(), device=order.device)
    rank = torch.empty_like(order)
    rank[order] = positions - group_starts[sorted_groups]
    return rank


def choice_pairs(expert_ids: torch.Tensor, gates: torch.Tensor):
    """(token, expert, gate) pairs of a token-choice routing, token-major.

    Args:
        expert_ids: LongTensor ``[T]`` (one expert per token) or ``[T, k]`` (top-k).
        gates: ``[T]`` or ``[T, k]``, the same shape.
    Returns:
        ``(token_index [A], expert_index [A], gates [A])`` with A = T*k: token t's pairs are rows
        ``t*k .. t*k+k-1`` (``token_index = arange(T*k) // k``; no host sync).
    """
    if expert_ids.dim() == 1:
        return torch.arange(expert_ids.shape[0], device=expert_ids.device), expert_ids, gates
    k = expert_ids.shape[1]
    token_index = torch.arange(expert_ids.numel(), device=expert_ids.device) // k
    return token_index, expert_ids.reshape(-1), gates.reshape(-1)

