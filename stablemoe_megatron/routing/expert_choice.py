"""Expert Choice routing (Zhou et al., NeurIPS 2022), an extra baseline, as pure torch functions.

Training: with router probabilities ``S = softmax(W h)`` of shape ``[T, N]``, every expert i picks
the k tokens with the highest ``S[t, i]`` (k = :func:`expert_capacity`); a token is processed by
0..N experts and its output is ``h_t + sum_{i picked t} S[t, i] * FFN_i(h_t)``. Experts are
perfectly balanced by construction, so no balance loss is needed.

Look-ahead leak: whether expert i picks token t depends on the probabilities of all other tokens
of the batch, including the LATER tokens of t's own sequence. In a causal language model the
routing of token t therefore uses information from the future, which the model can exploit
during training and which is not available when generating token by token.

Evaluation therefore uses causal THRESHOLD routing (:func:`threshold_assignment`): token t goes to
every expert i with ``S[t, i] >= threshold_i``, a decision that depends on token t alone. The
thresholds are estimated during training: each step's admission threshold is the k-th largest
probability per expert (:func:`kth_largest_probs`), and the caller keeps an exponential moving
average of it (stored with the model) and uses that average at evaluation.
"""
from __future__ import annotations

import math

import torch

from .registry import RoutingAlgorithm, StateBuffer, register_routing
from .switch import router_logits, router_probs


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert ``k = max(1, min(T, round(T * c / N)))``.

    Rounding is half-up (``floor(x + 0.5)``, not Python's half-to-even ``round``), so 2.5 -> 3;
    the result is clamped to ``[1, T]`` (``torch.topk`` cannot take more than T tokens).
    """
    if num_experts <= 0 or capacity_factor <= 0:
        raise ValueError(
            f"need num_experts > 0 and capacity_factor > 0, got {num_experts} and {capacity_factor}"
        )
    k = math.floor(num_tokens * capacity_factor / num_experts + 0.5)
    return max(1, min(num_tokens, k))


def expert_choice_assignment(
    probs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each expert picks its top-k tokens.

    Args:
        probs: ``[T, N]`` router probabilities.
        k: tokens per expert, ``1 <= k <= T``.
    Returns:
        ``(token_index [N*k], expert_index [N*k], gates [N*k])``: pair j routes token
        ``token_index[j]`` to expert ``expert_index[j]`` with gate ``probs[token, expert]``
        (differentiable). Pairs are ordered by expert, then by rank (highest probability first).
    """
    num_experts = probs.shape[1]
    top = probs.t().topk(k, dim=1)  # values, indices: [N, k]
    expert_index = torch.arange(num_experts, device=probs.device).repeat_interleave(k)
    return top.indices.reshape(-1), expert_index, top.values.reshape(-1)


@torch.no_grad()
def kth_largest_probs(probs: torch.Tensor, k: int) -> torch.Tensor:
    """The batch's admission thresholds: ``[N]``, the k-th largest probability of each expert.

    Detached. Every pair chosen by :func:`expert_choice_assignment` has ``probs >= threshold``.
    """
    return probs.detach().topk(k, dim=0).values[k - 1]


def threshold_assignment(
    probs: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal routing: token t goes to every expert i with ``probs[t, i] >= thresholds[i]``.

    Args:
        probs: ``[T, N]`` router probabilities.
        thresholds: ``[N]`` per-expert thresholds (e.g. an EMA of :func:`kth_largest_probs`).
    Returns:
        ``(token_index [M], expert_index [M], gates [M])`` for the M selected pairs, ordered by
        expert then token; ``gates = probs[token, expert]`` (differentiable). A token may get
        0..N experts; its routing depends on its own probabilities only. Uses ``nonzero``
        (a host sync): meant for evaluation.
    """
    selected = probs.detach().t() >= thresholds.to(probs.device, probs.dtype).unsqueeze(1)
    expert_index, token_index = selected.nonzero(as_tuple=True)
    return token_index, expert_index, probs[token_index, expert_index]


def expert_choice_eval_routing(hidden, weight, token_ids=None, state=None, expert_ids=None):
    """Evaluation routing: :func:`threshold_assignment` of ``softmax(W h)``.

    Args:
        hidden: ``[T, d]``; weight: ``[N, d]``; state: ``{"thresholds": [N], ...}``;
        token_ids, expert_ids: unused.
    Returns:
        ``(token_index [M], expert_index [M], gates [M])`` (a token gets 0..N experts).
    """
    probs = router_probs(router_logits(hidden, weight))
    return threshold_assignment(probs, state["thresholds"])


ALGORITHM = register_routing(RoutingAlgorithm(
    name="expert-choice",
    description="Expert Choice: each expert takes its top-k tokens by softmax(W h); causal "
    "threshold routing (EMA of the k-th largest probability) at evaluation",
    adapter="expert-choice",
    gate="softmax",
    learned=True,
    one_pair_per_token=False,
    uses_token_ids=False,
    losses=("z_loss",),
    default_capacity_factor=2.0,
    state_buffers=(StateBuffer("thresholds", "experts", "float"),
                   StateBuffer("thresholds_initialized", "scalar", "bool")),
    scores=router_logits,
    train_routing=expert_choice_assignment,
    eval_routing=expert_choice_eval_routing,
))
