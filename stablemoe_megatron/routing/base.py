"""BASE layer routing (Lewis et al., ICML 2021), one of the paper's baselines: balanced linear assignment.

Training: every expert i receives exactly ``capacities[i]`` tokens (default: T/N each, the first
``T mod N`` experts one more) and the assignment maximises ``sum_t scores[t, a_t]``, solved by a
forward AUCTION (Bertsekas 1992) with epsilon-scaling, written in vectorised torch so it runs on
the scores' device. Inference: greedy argmax (:func:`greedy_assignment`, re-exported here),
because balancing over a batch would make a token's expert depend on the other tokens.
The gate is ``sigmoid(s_{t,a_t})`` (:func:`stablemoe.sigmoid_gate`) and there is no balance loss.

Auction: tokens are bidders, experts are objects with capacity c_i and a price p_i. Each round,
every unassigned token t bids for its best expert j = argmax_i (s_{t,i} - p_i), raising the price
by the margin over its second-best expert plus epsilon: ``bid = s_{t,j} - second_best + eps``.
Each expert keeps the c_j highest bids among its current holders and the new bidders, evicted
tokens become unassigned, and a full expert's price becomes its lowest kept bid. When no token
is unassigned, the assignment is within ``T * eps`` of the optimum. Epsilon-scaling runs the
auction with eps = range/4, range/16, ... down to the final epsilon (default
``1e-6 * range / T``, so the total is within ``1e-6 * range`` of the optimum), each phase
warm-started from the previous phase's prices, which keeps the number of rounds small.

Host syncs: the loop condition "is any token unassigned" is read on the host once per round (a
device-to-host sync per round), plus a few at the start (score range, capacity check). That is
acceptable for BASE: the paper's BASE layer also runs an auction per batch. Internally float64.
"""
from __future__ import annotations

import torch

from .common import rank_within_group, tokens_per_expert
from .registry import RoutingAlgorithm, register_routing
from .stablemoe import centroid_eval_routing, centroid_scores, chosen_sigmoid_gate, greedy_assignment, sigmoid_gate

EPSILON_SCALE_FACTOR = 4.0


def balanced_capacities(num_tokens: int, num_experts: int, device=None) -> torch.Tensor:
    """LongTensor ``[N]``: ``floor(T/N)`` tokens per expert, the first ``T mod N`` experts one more."""
    if num_experts <= 0 or num_tokens < 0:
        raise ValueError(f"need num_experts > 0 and num_tokens >= 0, got {num_experts}, {num_tokens}")
    capacities = torch.full((num_experts,), num_tokens // num_experts, dtype=torch.long, device=device)
    capacities[: num_tokens % num_experts] += 1
    return capacities


def _check_capacities(capacities: torch.Tensor, num_tokens: int, num_experts: int) -> None:
    """Validate shape, sign and total (host sync: BASE syncs anyway)."""
    if capacities.shape != (num_experts,):
        raise ValueError(f"capacities must have shape [{num_experts}], got {list(capacities.shape)}")
    if bool((capacities < 0).any()) or int(capacities.sum()) != num_tokens:
        raise ValueError(
            f"capacities must be non-negative and sum to the number of tokens {num_tokens}, "
            f"got sum {int(capacities.sum())}"
        )


def _auction_phase(
    values: torch.Tensor,
    capacities: torch.Tensor,
    prices: torch.Tensor,
    epsilon: float,
    max_rounds: int,
) -> tuple[torch.Tensor, int]:
    """One auction at a fixed epsilon, starting with every token unassigned.

    Args:
        values: float64 ``[T, N]`` scores.
        capacities: LongTensor ``[N]`` summing to T.
        prices: float64 ``[N]`` start prices, updated IN PLACE (the warm start of the next phase);
            +inf for experts of capacity 0.
        epsilon: bid increment floor (> 0).
        max_rounds: rounds allowed in this phase.
    Returns:
        ``(assignment LongTensor [T], rounds used)``, or ``(None, max_rounds)`` when out of rounds.
    """
    num_tokens, num_experts = values.shape
    assignment = torch.full((num_tokens,), -1, dtype=torch.long, device=values.device)
    held_bid = torch.zeros(num_tokens, dtype=values.dtype, device=values.device)
    for round_index in range(max_rounds):
        bidders = (assignment < 0).nonzero().squeeze(1)  # host sync: the loop condition
        if bidders.numel() == 0:
            return assignment, round_index
        net_values = values[bidders] - prices  # [U, N]
        best_two = net_values.topk(2, dim=1)
        best_expert = best_two.indices[:, 0]
        bids = values[bidders, best_expert] - best_two.values[:, 1] + epsilon

        candidate_expert = assignment.clone()  # holders keep their bid, bidders add theirs
        candidate_expert[bidders] = best_expert
        candidate_bid = held_bid.clone()
        candidate_bid[bidders] = bids
        rank = rank_within_group(candidate_expert, candidate_bid, num_experts)
        kept = rank < capacities[candidate_expert]
        assignment = torch.where(kept, candidate_expert, -1)
        held_bid = torch.where(kept, candidate_bid, 0.0)

        is_full = tokens_per_expert(candidate_expert[kept], num_experts) == capacities
        kept_bids = torch.where(kept, candidate_bid, torch.inf)
        lowest_kept = torch.full_like(prices, torch.inf).scatter_reduce(
            0, candidate_expert, kept_bids, reduce="amin"
        )
        prices.copy_(torch.where(is_full & (capacities > 0), lowest_kept, prices))
    return None, max_rounds


def balanced_assignment(
    scores: torch.Tensor,
    capacities: torch.Tensor | None = None,
    epsilon: float | None = None,
    *,
    max_rounds: int | None = None,
) -> torch.Tensor:
    """Exact balanced linear assignment of tokens to experts by an epsilon-scaled auction.

    Args:
        scores: ``[T, N]`` token-expert affinities (detached; any float dtype, float64 inside).
        capacities: LongTensor ``[N]`` tokens per expert, summing to T; default
            :func:`balanced_capacities`. Experts of capacity 0 receive nothing.
        epsilon: final bid increment; the total score is within ``T * epsilon`` of the optimum.
            Default ``1e-6 * (max - min score) / T``.
        max_rounds: hard cap on auction rounds over all phases (default ``100 * T + 10_000``);
            exceeding it raises ``RuntimeError``.
    Returns:
        LongTensor ``[T]`` on ``scores.device``: expert of every token, with
        ``bincount(result, minlength=N) == capacities``.
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    if capacities is None:
        capacities = balanced_capacities(num_tokens, num_experts, device=device)
    capacities = capacities.to(device=device, dtype=torch.long)
    _check_capacities(capacities, num_tokens, num_experts)
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    usable = capacities > 0
    if int(usable.sum()) == 1:  # a single expert takes everything; the auction needs two
        return torch.full((num_tokens,), int(usable.long().argmax()), dtype=torch.long, device=device)

    values = scores.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("balanced_assignment: scores must be finite")
    score_range = float(values.max() - values.min()) or 1.0  # all-equal scores: any scale works
    final_epsilon = 1e-6 * score_range / num_tokens if epsilon is None else float(epsilon)
    if not final_epsilon > 0:
        raise ValueError(f"balanced_assignment: epsilon must be > 0, got {epsilon}")
    round_cap = 100 * num_tokens + 10_000 if max_rounds is None else int(max_rounds)
    rounds_left = round_cap

    prices = torch.where(usable, 0.0, torch.inf).to(device=device, dtype=torch.float64)
    phase_epsilon = max(score_range / EPSILON_SCALE_FACTOR, final_epsilon)
    while True:
        assignment, used = _auction_phase(values, capacities, prices, phase_epsilon, rounds_left)
        if assignment is None:
            raise RuntimeError(
                f"balanced_assignment: auction did not finish within max_rounds={round_cap} rounds "
                f"(T={num_tokens}, N={num_experts}, epsilon={phase_epsilon:g}); scores may be "
                "degenerate or epsilon too small for their range"
            )
        rounds_left -= used
        if phase_epsilon <= final_epsilon:
            return assignment
        phase_epsilon = max(phase_epsilon / EPSILON_SCALE_FACTOR, final_epsilon)


def base_routing(scores: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Routing of the local tokens: the balanced assignment in training, greedy otherwise.

    Args:
        scores: ``[T, N]`` centroid scores of the local tokens.
        context: the calling router (:class:`.registry.RoutingContext`): its training mode, and
            ``over_micro_batch``, which solves the assignment on the scores of the whole
            micro-batch (all sequence-parallel shards, identical on every rank) and keeps this
            rank's rows.
    Returns:
        ``(expert_ids [T], sigmoid gates [T], {})``: BASE adds no loss.
    """
    if not context.training:
        expert_ids = greedy_assignment(scores)
    else:
        with torch.no_grad():
            expert_ids = context.over_micro_batch(balanced_assignment, scores.detach())
    return expert_ids, sigmoid_gate(scores, expert_ids), {}


ALGORITHM = register_routing(RoutingAlgorithm(
    name="base",
    description="BASE layer: balanced linear assignment by auction in training (greedy at "
    "inference), sigmoid gate, no balance loss",
    adapter="top1",
    gate="sigmoid",
    learned=True,
    one_pair_per_token=True,
    uses_token_ids=False,
    distillable=True,
    scores=centroid_scores,
    train_routing=base_routing,
    eval_routing=centroid_eval_routing,
    chosen_gate=chosen_sigmoid_gate,
))

__all__ = ["balanced_capacities", "balanced_assignment", "greedy_assignment", "base_routing", "ALGORITHM"]
