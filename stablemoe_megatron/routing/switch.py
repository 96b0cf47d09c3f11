"""Switch Transformer routing (Fedus et al. 2021; SPEC section 4), as pure torch functions.

    p_t   = softmax(W h_t)                    router_probs (float32)
    a_t   = argmax_i p_{t,i},  g_t = p_{t,a_t} top1
    L_aux = N * sum_i f_i * P_i               switch_aux_loss
    L_z   = sum_t logsumexp(logits_t)^2 / T   z_loss (ST-MoE, Zoph et al. 2022)

with ``f_i = n_i / num_tokens`` (fraction of the counting set routed to i, a constant) and
``P_i = sum_t p_{t,i} / num_tokens`` (mean router probability, differentiable). Both losses are
returned UNWEIGHTED; the sums run over the given tokens only and divide by the counting-set size,
so partial losses computed on a split of the tokens (global counts passed in) add up to the loss
on all tokens.
"""
from __future__ import annotations

import torch

from .common import as_token_count, compute_dtype, counting_set
from .types import register_routing

register_routing(
    "switch",
    learned=True,
    token_choice=True,
    uses_token_ids=False,
    gate="softmax",
    description="Switch Transformer: greedy top-1 over softmax(W h), softmax-probability gate, "
    "auxiliary load-balancing loss",
)


def router_probs(logits: torch.Tensor) -> torch.Tensor:
    """Router probabilities ``softmax(logits)`` over experts: ``[T, N]`` in float32 (float64 stays)."""
    return torch.softmax(logits.to(compute_dtype(logits)), dim=-1)


def top1(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 choice: ``(expert_ids LongTensor [T], gates [T])``.

    ``expert_ids`` = argmax over experts (ties: lowest index); ``gates`` = the probability of the
    chosen expert, differentiable w.r.t. ``probs``.
    """
    expert_ids = probs.detach().argmax(dim=-1)
    gates = probs.gather(1, expert_ids.unsqueeze(1)).squeeze(1)
    return expert_ids, gates


def switch_aux_loss(
    probs: torch.Tensor,
    expert_ids: torch.Tensor,
    tokens_per_expert: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch load-balancing loss ``N * sum_i f_i * P_i``, unweighted.

    Args:
        probs: ``[T, N]`` router probabilities of the local tokens.
        expert_ids: LongTensor ``[T]`` top-1 choices (used only when counts are not given).
        tokens_per_expert: ``[N]`` counts n_i over the counting set; None: counted locally.
        num_tokens: counting-set size; None: the sum of the given counts, else T.
    Returns:
        0-d tensor; 1.0 for a perfectly uniform router on a balanced batch. Gradient flows
        through ``probs`` only (``f_i`` is a constant).
    """
    num_experts = probs.shape[-1]
    dtype = compute_dtype(probs)
    counts, total = counting_set(expert_ids, num_experts, tokens_per_expert, num_tokens, dtype)
    fraction_routed = counts / total  # f_i, [N]
    mean_prob = probs.to(dtype).sum(dim=0) / total  # P_i, [N]
    return num_experts * (fraction_routed * mean_prob).sum()


def z_loss(logits: torch.Tensor, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss ``sum_t logsumexp(logits_t)^2 / num_tokens`` (ST-MoE), unweighted.

    Args:
        logits: ``[T, N]`` router logits of the local tokens.
        num_tokens: counting-set size; None: T.
    Returns:
        0-d tensor (float32, float64 for float64 logits); keeps router logits small.
    """
    dtype = compute_dtype(logits)
    total = as_token_count(num_tokens, logits.device, dtype, default=logits.shape[0])
    return torch.logsumexp(logits.to(dtype), dim=-1).square().sum() / total
