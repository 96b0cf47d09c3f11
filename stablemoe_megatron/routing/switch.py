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

Top-k (``--moe-router-topk`` k > 1), Megatron-LM's ``TopKRouter`` with the softmax score function
(megatron-core ``moe_utils.topk_routing_with_score_function``, ``switch_load_balancing_loss_func``):

    A_t   = the k experts of largest l_{t,i} (= of largest p_{t,i})          topk_choice
    g_t,i = p_{t,i}                                     (pre_softmax)        topk_gates
    g_t,i = softmax_{j in A_t}(l_{t,j})_i = p_{t,i} / sum_{j in A_t} p_{t,j}  (default for k > 1)
    L_aux = N * sum_i (n_i / (k * num_tokens)) * P_i                         switch_aux_loss(topk=k)

where ``n_i`` counts the (token, expert) pairs routed to i, so ``f_i`` still sums to 1. At k = 1
the functions are the top-1 ones above, bit for bit (the post-softmax gate of one expert would be
the constant 1, which Megatron refuses too).
"""
from __future__ import annotations

import torch

from .common import as_token_count, choice_pairs, compute_dtype, counting_set
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


def topk_gates(logits: torch.Tensor, expert_ids: torch.Tensor, pre_softmax: bool,
               probs: torch.Tensor | None = None) -> torch.Tensor:
    """Gates ``[T, k]`` of the chosen experts ``expert_ids [T, k]``, differentiable w.r.t. ``logits``.

    ``pre_softmax``: the probabilities over all N experts (``probs``, computed from ``logits`` when
    not given), Megatron's ``--moe-router-pre-softmax``; otherwise the softmax over the k chosen
    logits (Megatron's default for k > 1): the chosen probabilities renormalised to sum to 1.
    """
    if pre_softmax:
        probs = router_probs(logits) if probs is None else probs
        return probs.gather(1, expert_ids)
    return torch.softmax(logits.to(compute_dtype(logits)).gather(1, expert_ids), dim=-1)


def topk_choice(logits: torch.Tensor, k: int, pre_softmax: bool,
                probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k choice: ``(expert_ids LongTensor [T, k], gates [T, k])``, experts by descending score.

    The experts are the k largest probabilities (``pre_softmax``) or logits (otherwise), as
    Megatron selects them (the same set: softmax is monotone); gates from :func:`topk_gates`.
    """
    scores = (router_probs(logits) if probs is None else probs) if pre_softmax else logits
    expert_ids = torch.topk(scores.detach(), k, dim=-1).indices
    return expert_ids, topk_gates(logits, expert_ids, pre_softmax, probs)


def switch_aux_loss(
    probs: torch.Tensor,
    expert_ids: torch.Tensor,
    tokens_per_expert: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
    topk: int = 1,
) -> torch.Tensor:
    """Switch load-balancing loss ``N * sum_i f_i * P_i``, unweighted.

    Args:
        probs: ``[T, N]`` router probabilities (softmax over all experts) of the local tokens.
        expert_ids: LongTensor ``[T]`` top-1 choices, or ``[T, k]`` top-k choices (used only when
            counts are not given).
        tokens_per_expert: ``[N]`` counts n_i over the counting set (pairs, for top-k); None:
            counted locally.
        num_tokens: counting-set size in tokens; None: the sum of the given counts / k, else T.
        topk: k; ``f_i = n_i / (k * num_tokens)`` (Megatron's normalisation for top-k).
    Returns:
        0-d tensor; 1.0 for a perfectly uniform router on a balanced batch. Gradient flows
        through ``probs`` only (``f_i`` is a constant).
    """
    num_experts = probs.shape[-1]
    dtype = compute_dtype(probs)
    if topk != 1 and num_tokens is None:
        num_tokens = expert_ids.shape[0] if tokens_per_expert is None else tokens_per_expert.sum() / topk
    counts, total = counting_set(expert_ids, num_experts, tokens_per_expert, num_tokens, dtype)
    fraction_routed = counts / total if topk == 1 else counts / (total * topk)  # f_i, [N]
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


def chosen_softmax_gate(hidden: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor,
                        pre_softmax: bool = True) -> torch.Tensor:
    """Gates of given experts (stage 2 of a distilled Switch router): ``[T]`` for ``expert_ids [T]``
    (the softmax over all N logits is needed, so this is :func:`softmax_gate` of
    :func:`router_logits`), ``[T, k]`` for ``expert_ids [T, k]`` (:func:`topk_gates`: renormalised
    over the k unless ``pre_softmax``), the gates top-k routing gives the same experts."""
    logits = router_logits(hidden, weight)
    if expert_ids.dim() == 1:
        return softmax_gate(logits, expert_ids)
    return topk_gates(logits, expert_ids, pre_softmax)


def switch_routing(logits: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Routing of the local tokens: top-1 of the probabilities, their probability as the gate, the
    load-balancing loss and, when its coefficient is non-zero, the z-loss; top-k
    (:func:`topk_choice`) when ``context.topk`` k > 1.

    Args:
        logits: ``[T, N]`` router logits.
        context: the calling router (:class:`.registry.RoutingContext`): expert counts over the
            counting set, the loss coefficients, ``topk`` and ``pre_softmax`` (absent: k = 1).
    Returns:
        ``(expert_ids [T], gates [T], {"aux_loss": 0-d[, "z_loss": 0-d]})`` (``[T, k]`` experts and
        gates for k > 1), losses unweighted. The probabilities are computed once, so the gate's
        and the loss's gradients meet there.
    """
    probs = router_probs(logits)
    k = getattr(context, "topk", 1)
    if k == 1:
        expert_ids, gates = top1(probs)
    else:
        expert_ids, gates = topk_choice(logits, k, context.pre_softmax, probs)
    counts, num_tokens = context.count(expert_ids)
    losses = {"aux_loss": switch_aux_loss(probs, expert_ids, counts, num_tokens, topk=k)}
    if context.loss_coeff("z_loss"):
        losses["z_loss"] = z_loss(logits, num_tokens)
    return expert_ids, gates, losses


def switch_eval_routing(hidden, weight, token_ids=None, state=None, expert_ids=None, *, topk=1,
                        pre_softmax=True):
    """Evaluation routing: top-1 of ``softmax(W h)`` (or the given ``expert_ids`` [T], stage 2),
    gate = that expert's probability. hidden ``[T, d]``, weight ``[N, d]``; token_ids and state
    unused. Returns ``(arange(T), expert_index [T], gates [T])``.

    ``topk`` k > 1 (or given ``expert_ids [T, k]``): :func:`topk_choice`, the pairs token-major:
    ``(arange(T*k) // k, expert_index [T*k], gates [T*k])``.
    """
    logits = router_logits(hidden, weight)
    probs = router_probs(logits)
    if expert_ids is None and topk > 1:
        expert_ids = topk_choice(logits, topk, pre_softmax, probs)[0]
    if expert_ids is not None and expert_ids.dim() == 2:
        return choice_pairs(expert_ids, topk_gates(logits, expert_ids, pre_softmax, probs))
    if expert_ids is None:
        expert_ids = top1(probs)[0]
    tokens = torch.arange(hidden.shape[0], device=hidden.device)
    return tokens, expert_ids, probs.gather(1, expert_ids.unsqueeze(1)).squeeze(1)


ALGORITHM = register_routing(RoutingAlgorithm(
    name="switch",
    description="Switch Transformer: greedy top-1 (or Megatron's top-k) over softmax(W h), "
    "softmax-probability gate, auxiliary load-balancing loss (and optionally the z-loss)",
    adapter="top1",
    gate="softmax",
    learned=True,
    one_pair_per_token=True,
    uses_token_ids=False,
    distillable=True,
    supports_topk=True,
    losses=("aux_loss", "z_loss"),
    scores=router_logits,
    train_routing=switch_routing,
    eval_routing=switch_eval_routing,
    chosen_gate=chosen_softmax_gate,
))
