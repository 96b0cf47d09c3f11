"""StableMoE stage-1 routing (Dai et al., ACL 2022, section 2), as pure torch functions.

    s_{t,i} = E_i . h_t                       centroid_scores
    a_t     = argmax_i s_{t,i}                greedy_assignment
    g_t     = sigmoid(s_{t,a_t})              sigmoid_gate
    L_bal   = sum_i ((n_i - nbar) / nbar) * sum_{t in A_i} sigmoid(s_{t,i})  / num_tokens

The balance loss is returned UNWEIGHTED (the caller multiplies by alpha, 0.3 in the paper) and as
a PER-TOKEN MEAN: the paper's equation 8 sums over the T tokens of a batch, and fairseq (where the
paper's code lives) divides summed losses by the number of tokens before backward, like the task
loss. ``n_i`` and ``num_tokens`` come from the counting set (see :mod:`.common`); ``nbar =
num_tokens / N``. Both are constants: gradient flows only through ``sigmoid(s_{t,a_t})``, so an
overloaded expert (n_i > nbar) has its scores pushed down and an idle one has them pushed up.
"""
from __future__ import annotations

import torch

from .common import compute_dtype, counting_set
from .common import tokens_per_expert  # re-exported; shadowed by balance_loss's argument
from .registry import RoutingAlgorithm, register_routing


def centroid_scores(hidden: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Token-expert affinities ``s = h @ E^T``.

    Args:
        hidden: ``[T, d]`` hidden states entering the MoE layer.
        centroids: ``[N, d]`` expert centroids E.
    Returns:
        ``[T, N]`` scores, in float32 when the inputs are half/bfloat16 (float64 stays float64),
        because argmax decisions and sigmoid gates are sensitive to low-precision rounding.
        Differentiable w.r.t. both inputs.
    """
    dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(centroids))
    return hidden.to(dtype) @ centroids.to(dtype).t()


def greedy_assignment(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 expert per token: LongTensor ``[T]`` = ``argmax_i scores[t, i]`` (ties: lowest index)."""
    return scores.detach().argmax(dim=-1)


def sigmoid_gate(scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Gate ``g_t = sigmoid(scores[t, expert_ids[t]])``: ``[T]``, differentiable w.r.t. ``scores``.

    The chosen score carries the task gradient back into the centroids and the hidden states,
    which is how the routing learns (the argmax itself has no gradient).
    """
    chosen = scores.gather(1, expert_ids.reshape(-1, 1)).squeeze(1)
    return torch.sigmoid(chosen)


def chosen_sigmoid_gate(hidden: torch.Tensor, centroids: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``sigmoid(E_{a_t} . h_t)`` for given experts ``a_t``: ``[T]``, without the ``[T, N]`` scores.

    Equals ``sigmoid_gate(centroid_scores(hidden, centroids), expert_ids)`` (up to float rounding:
    a row-wise dot product instead of a GEMM), with the same gradients w.r.t. ``hidden`` and the
    chosen centroid rows. For frozen stage-2 routing, where the expert is already known from the
    token id: one ``[T, d]`` multiply-add instead of a ``[T, d] x [d, N]`` GEMM forward and two
    backward.

    Args:
        hidden: ``[T, d]``; centroids: ``[N, d]``; expert_ids: ``[T]`` long.
    """
    dtype = torch.promote_types(compute_dtype(hidden), compute_dtype(centroids))
    return torch.sigmoid(_ChosenDot.apply(hidden.to(dtype), centroids.to(dtype), expert_ids.reshape(-1)))


class _ChosenDot(torch.autograd.Function):
    """Row-wise ``<hidden_t, centroids[ids_t]>``: ``[T]``, keeping no ``[T, d]`` tensor for the
    backward (the chosen centroid rows are gathered again there).

    hidden: ``[T, d]``; centroids: ``[N, d]``; ids: ``[T]`` long. Backward, for ``g = dL/dlogit``
    ``[T]``: ``dL/dh_t = g_t E_{a_t}``; ``dL/dE_i = sum_{t: a_t = i} g_t h_t``.
    """

    @staticmethod
    def forward(ctx, hidden, centroids, ids):
        ctx.save_for_backward(hidden, centroids, ids)
        return torch.linalg.vecdot(hidden, centroids.index_select(0, ids))

    @staticmethod
    def backward(ctx, grad):
        hidden, centroids, ids = ctx.saved_tensors
        weight = grad.unsqueeze(-1)
        grad_hidden = grad_centroids = None
        if ctx.needs_input_grad[1]:  # first: its [T, d] temporary is freed before grad_hidden exists
            grad_centroids = torch.zeros_like(centroids).index_add_(0, ids, hidden * weight)
        if ctx.needs_input_grad[0]:
            grad_hidden = centroids.index_select(0, ids).mul_(weight)
        return grad_hidden, grad_centroids, None


def balance_loss(
    scores: torch.Tensor,
    expert_ids: torch.Tensor,
    tokens_per_expert: torch.Tensor | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """StableMoE balance loss (paper eq. 8), unweighted, per-token mean over the counting set.

    Args:
        scores: ``[T, N]`` centroid scores of the local tokens.
        expert_ids: LongTensor ``[T]``, the assignment a_t of the local tokens.
        tokens_per_expert: ``[N]`` counts n_i over the counting set (e.g. all-reduced over the
            sequence-parallel group); None: counted from ``expert_ids``.
        num_tokens: counting-set size; None: ``tokens_per_expert.sum()`` when counts are given,
            else T.
    Returns:
        0-d tensor ``sum_t ((n_{a_t} - nbar) / nbar) * sigmoid(s_{t,a_t}) / num_tokens`` with
        ``nbar = num_tokens / N`` (float32, float64 for float64 scores). The sum runs over the
        local tokens only, so a caller holding part of the counting set sums the partial losses
        over ranks to get the full loss.
    """
    num_experts = scores.shape[-1]
    dtype = compute_dtype(scores)
    counts, total = counting_set(expert_ids, num_experts, tokens_per_expert, num_tokens, dtype)
    mean_load = total / num_experts
    overload = (counts - mean_load) / mean_load  # [N], constant
    gates = sigmoid_gate(scores.to(dtype), expert_ids)  # [T], carries the gradient
    return (overload[expert_ids.reshape(-1)] * gates).sum() / total


def stablemoe_routing(scores: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stage-1 routing of the local tokens: greedy top-1, sigmoid gate, the balance loss.

    Args:
        scores: ``[T, N]`` centroid scores.
        context: the calling router (:class:`.registry.RoutingContext`), which counts the experts'
            tokens over the counting set.
    Returns:
        ``(expert_ids [T], gates [T], {"balance_loss": unweighted 0-d loss})``.
    """
    expert_ids = greedy_assignment(scores)
    gates = sigmoid_gate(scores, expert_ids)
    counts, num_tokens = context.count(expert_ids)
    return expert_ids, gates, {"balance_loss": balance_loss(scores, expert_ids, counts, num_tokens)}


def centroid_eval_routing(hidden, centroids, token_ids=None, state=None, expert_ids=None):
    """Evaluation routing of a centroid router (StableMoE, BASE): greedy top-1, sigmoid gate.

    Args:
        hidden: ``[T, d]``; centroids: ``[N, d]``; token_ids, state: unused (the registry's
            common signature); expert_ids: ``[T]`` experts chosen elsewhere (the distilled router
            in stage 2), or None for the argmax of the scores.
    Returns:
        ``(token_index [T] = arange(T), expert_index [T], gates [T])``.
    """
    scores = centroid_scores(hidden, centroids)
    if expert_ids is None:
        expert_ids = greedy_assignment(scores)
    tokens = torch.arange(hidden.shape[0], device=hidden.device)
    return tokens, expert_ids, sigmoid_gate(scores, expert_ids)


ALGORITHM = register_routing(RoutingAlgorithm(
    name="stablemoe",
    description="StableMoE: greedy top-1 over centroid scores, sigmoid gate, balance loss, "
    "distilled into a token-id router that is frozen for stage 2",
    adapter="top1",
    gate="sigmoid",
    learned=True,
    one_pair_per_token=True,
    uses_token_ids=False,
    distillable=True,
    default_distill_router="wordemb",
    default_capacity_factor=2.0,
    losses=("balance_loss",),
    scores=centroid_scores,
    train_routing=stablemoe_routing,
    eval_routing=centroid_eval_routing,
    chosen_gate=chosen_sigmoid_gate,
))

__all__ = [
    "centroid_scores",
    "greedy_assignment",
    "sigmoid_gate",
    "chosen_sigmoid_gate",
    "balance_loss",
    "stablemoe_routing",
    "centroid_eval_routing",
    "tokens_per_expert",
    "ALGORITHM",
]
