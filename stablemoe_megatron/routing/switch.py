"""Switch Transformer routing (Fedus et al. 2021), one of the paper's baselines, as pure torch functions.

    l_t   = W h_t                             router_logits (float32)
    p_t   = softmax(l_t)                      router_probs (float32)
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
from .registry import RoutingAlgorithm, register_routing


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits ``h @ W^T`` in float32: ``[T, N]`` from hidden ``[T, d]`` and weight ``[N, d]``.

    Also Expert Choice's scores. Differentiable w.r.t. both inputs.
    """
    return hidden.float() @ weight.float().t()


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


def softmax_gate(logits: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Gate ``softmax(logits)[t, expert_ids[t]]``: ``[T]``, differentiable w.r.t. ``logits``."""
    return router_probs(logits).gather(1, expert_ids.unsqueeze(1)).squeeze(1)


def chosen_softmax_gate(hidden: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Gates ``[T]`` of given experts (stage 2 of a distilled Switch router): the softmax over all
    N logits is needed, so this is :func:`softmax_gate` of :func:`router_logits`."""
    return softmax_gate(router_logits(hidden, weight), expert_ids)


def switch_routing(logits: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Routing of the local tokens: top-1 of the probabilities, their probability as the gate, the
    load-balancing loss and, when its coefficient is non-zero, the z-loss.

    Args:
        logits: ``[T, N]`` router logits.
        context: the calling router (:class:`.registry.RoutingContext`): expert counts over the
            counting set and the loss coefficients.
    Returns:
        ``(expert_ids [T], gates [T], {"aux_loss": 0-d[, "z_loss": 0-d]})``, losses unweighted.
        The probabilities are computed once, so the gate's and the loss's gradients meet there.
    """
    probs = router_probs(logits)
    expert_ids, gates = top1(probs)
    counts, num_tokens = context.count(expert_ids)
    losses = {"aux_loss": switch_aux_loss(probs, expert_ids, counts, num_tokens)}
    if context.loss_coeff("z_loss"):
        losses["z_loss"] = z_loss(logits, num_tokens)
    return expert_ids, gates, losses


def switch_eval_routing(hidden, weight, token_ids=None, state=None, expert_ids=None):
    """Evaluation routing: top-1 of ``softmax(W h)`` (or the given ``expert_ids`` [T], stage 2),
    gate = that expert's probability. hidden ``[T, d]``, weight ``[N, d]``; token_ids and state
    unused. Returns ``(arange(T), expert_index [T], gates [T])``."""
    probs = router_probs(router_logits(hidden, weight))
    if expert_ids is None:
        expert_ids = top1(probs)[0]
    tokens = torch.arange(hidden.shape[0], device=hidden.device)
    return tokens, expert_ids, probs.gather(1, expert_ids.unsqueeze(1)).squeeze(1)


ALGORITHM = register_routing(RoutingAlgorithm(
    name="switch",
    description="Switch Transformer: greedy top-1 over softmax(W h), softmax-probability gate, "
    "auxiliary load-balancing loss (and optionally the z-loss)",
    adapter="top1",
    gate="softmax",
    learned=True,
    one_pair_per_token=True,
    uses_token_ids=False,
    distillable=True,
    losses=("aux_loss", "z_loss"),
    scores=router_logits,
    train_routing=switch_routing,
    eval_routing=switch_eval_routing,
    chosen_gate=chosen_softmax_gate,
))
