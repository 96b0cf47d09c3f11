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

Host syncs: ONE per convergence check and nothing else (plus one to validate ``capacities``
when a caller passes them on the device). Why one: the host must decide when to stop launching
rounds, so it has to read a "done" flag; everything else stays on the device. A round works on
fixed-size ``[T]`` / ``[T, N]`` tensors (masked updates with ``torch.where``, sorts and
scatters; no boolean-mask indexing or ``nonzero``, whose output size the host would have to
read), the phase transition (every token assigned -> next epsilon, every token unassigned
again) happens inside a round, and the score range, the epsilons and the finiteness check are
device tensors. The flag is read (with the epsilon and the phase lengths, in the same transfer)
after 2P rounds (P: the number of epsilon phases, 16-17 at the benchmark sizes), then after
intervals that double the rounds run, or shorter ones when the phases left would take fewer
rounds at the pace of the last completed phase (:func:`rounds_before_next_check`); a call that
needs R rounds makes about ``log2(R / 2P) + 1`` checks, one more per too-short estimate.
Measured on the benchmark layer's scores: 2 syncs at T=2048, N=8 (89 rounds needed, 96 run)
and 4 at T=8192, N=32 (440 needed, 510 run), where reading "is any token unassigned" every
round made 199 and 902.
Rounds after convergence are exact no-ops, so the result does not depend on when the host
checks: it is the assignment of checking after every round, i.e. the old loop's, round for
round. The price is the rounds run between convergence and the next check, and bids computed
for every token, not only the unassigned ones. Internally float64.

:func:`approximate_balanced_assignment` runs a fixed number of rounds instead (no sync at all)
and returns, with its exactly balanced assignment, a duality bound on what it loses; the router
uses the exact assignment.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

from .registry import RoutingAlgorithm, register_routing
from .stablemoe import centroid_eval_routing, centroid_scores, chosen_sigmoid_gate, greedy_assignment, sigmoid_gate

EPSILON_SCALE_FACTOR = 4.0
FINAL_EPSILON_FRACTION = 1e-6  # default final epsilon: this fraction of the score range, over T


def balanced_capacities(num_tokens: int, num_experts: int, device=None) -> torch.Tensor:
    """LongTensor ``[N]``: ``floor(T/N)`` tokens per expert, the first ``T mod N`` experts one more."""
    if num_experts <= 0 or num_tokens < 0:
        raise ValueError(f"need num_experts > 0 and num_tokens >= 0, got {num_experts}, {num_tokens}")
    capacities = torch.full((num_experts,), num_tokens // num_experts, dtype=torch.long, device=device)
    capacities[: num_tokens % num_experts] += 1
    return capacities


def _usable_experts(capacities: torch.Tensor | None, num_tokens: int, num_experts: int) -> Tuple[int, int]:
    """``(number of experts with capacity > 0, index of the first one)``, validating ``capacities``.

    Default capacities (None) are known on the host: no sync. Given capacities are read in ONE
    transfer (a host sync if they live on the device): their shape, sign and total are checked.
    """
    if capacities is None:
        return min(num_tokens, num_experts), 0
    if capacities.shape != (num_experts,):
        raise ValueError(f"capacities must have shape [{num_experts}], got {list(capacities.shape)}")
    usable = capacities > 0
    lowest, total, num_usable, first = torch.stack(
        [capacities.min(), capacities.sum(), usable.sum(), usable.long().argmax()]
    ).tolist()
    if lowest < 0 or total != num_tokens:
        raise ValueError(
            f"capacities must be non-negative and sum to the number of tokens {num_tokens}, got sum {total}"
        )
    return num_usable, first


def phase_epsilons(first: float, final: float) -> List[float]:
    """The epsilon of every phase: ``first``, ``first / 4``, ... (never below ``final``), ``final``."""
    epsilons = [first]
    while epsilons[-1] > final:
        epsilons.append(max(epsilons[-1] / EPSILON_SCALE_FACTOR, final))
    return epsilons


def default_phase_count(num_tokens: int) -> int:
    """Number of phases at the default final epsilon (range/4 down to ``1e-6 * range / T``; the
    range cancels): 13 at T=64, 16 at T=2048, 17 at T=8192."""
    return len(phase_epsilons(1.0 / EPSILON_SCALE_FACTOR, FINAL_EPSILON_FRACTION / max(num_tokens, 1)))


def first_check_rounds(num_tokens: int) -> int:
    """Rounds before the first host check: 2P (P = :func:`default_phase_count`). Every phase
    takes at least one round and rarely fewer than two, so an earlier check would mostly find
    the auction still running."""
    return 2 * default_phase_count(num_tokens)


def rounds_before_next_check(
    rounds_done: int, previous: int, phase: int, num_phases: int, phase_rounds: int, last_phase_rounds: int
) -> int:
    """Rounds to run before the next host check of the "done" flag (the check schedule).

    ``max(2 * previous, rounds_done)`` (the rounds run double from check to check, so a call
    needing R rounds makes about ``log2(R)`` checks), or fewer: the rounds the phases left would
    take at the pace of the last completed phase, when that is less. Late phases are short and
    alike, and the auction ends with about ten of them, so the estimate is good where it
    matters: replayed on the per-phase round counts of 48 random benchmark-like problems
    (T*N from 64*4 to 8192*32), doubling alone ran 73 % more rounds than needed on average,
    this 18 %, with at most 5 checks either way. Only the checks and the wasted no-op rounds
    depend on the schedule, never the result.

    Args:
        rounds_done: rounds run so far; previous: rounds of the last interval.
        phase: index of the current phase (0 = first); num_phases: phases of this call.
        phase_rounds: rounds run in the current phase so far.
        last_phase_rounds: rounds of the last completed phase (0: none completed yet).
    """
    limit = max(2 * previous, rounds_done)
    if last_phase_rounds <= 0:
        return limit
    left = max(last_phase_rounds - phase_rounds, 1) + (num_phases - 1 - phase) * last_phase_rounds
    return max(1, min(limit, left))


class _Problem(NamedTuple):
    """The constants of one assignment, on the scores' device.

    values: float64 ``[T, N]`` scores. capacities: LongTensor ``[N]`` summing to T.
    usable: bool ``[N]``, capacity > 0. final_epsilon: float64 ``[]``.
    positions: ``arange(T)``. ones: LongTensor ``[T]`` of ones.
    """

    values: torch.Tensor
    capacities: torch.Tensor
    usable: torch.Tensor
    final_epsilon: torch.Tensor
    positions: torch.Tensor
    ones: torch.Tensor


class _AuctionState(NamedTuple):
    """The auction's device state; every field has a fixed shape, so no round needs the host.

    assignment: LongTensor ``[T]``, expert of every token or -1 (unassigned).
    held_bid: float64 ``[T]``, the bid with which an assigned token holds its expert.
    prices: float64 ``[N]``, +inf for experts of capacity 0.
    epsilon: float64 ``[]``, the current phase's bid increment.
    phase_start: LongTensor ``[]``, the round that started the current phase;
    last_phase_rounds: LongTensor ``[]``, rounds of the last completed phase (for the check
    schedule only).
    """

    assignment: torch.Tensor
    held_bid: torch.Tensor
    prices: torch.Tensor
    epsilon: torch.Tensor
    phase_start: torch.Tensor
    last_phase_rounds: torch.Tensor


def _keep_highest_bids(
    problem: _Problem, expert: torch.Tensor, bid: torch.Tensor, prices: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every expert keeps its ``capacity`` highest candidate bids (equal bids: earlier token first).

    Args:
        expert: LongTensor ``[T]``, every token's candidate expert; bid: float64 ``[T]``, its bid.
        prices: float64 ``[N]`` before the round.
    Returns:
        ``(kept bool [T], prices [N])``: a full expert's price becomes its lowest kept bid, the
        others keep theirs. Two stable sorts (bid, then expert) order the candidates by expert
        and, within an expert, by decreasing bid; no host sync.
    """
    by_bid = torch.sort(bid, descending=True, stable=True).indices
    by_expert = torch.sort(expert[by_bid], stable=True)
    order = by_bid[by_expert.indices]  # [T] tokens grouped by expert, highest bid first
    group_size = torch.zeros_like(problem.capacities).scatter_add_(0, expert, problem.ones)
    group_end = torch.cumsum(group_size, 0) - group_size + problem.capacities  # start + capacity
    kept = torch.empty_like(expert, dtype=torch.bool).scatter_(
        0, order, problem.positions < group_end[by_expert.values]
    )
    lowest_kept = bid[order][(group_end - 1).clamp(0, expert.shape[0] - 1)]
    return kept, torch.where((group_size >= problem.capacities) & problem.usable, lowest_kept, prices)


def _auction_round(problem: _Problem, state: _AuctionState, round_index: int) -> _AuctionState:
    """One auction round on the whole ``[T, N]`` problem, with the phase transition on the device.

    If every token is assigned and epsilon is above the final one, the next phase starts first:
    epsilon /= :data:`EPSILON_SCALE_FACTOR` (not below the final one), every token unassigned,
    prices kept (the warm start). Then every unassigned token bids; the bids of assigned tokens
    are computed and discarded (fixed shapes instead of a host-sized subset). Once every token
    is assigned at the final epsilon, a round changes nothing: no bidder, every expert keeps its
    holders (it holds exactly its capacity), and its price is again its lowest held bid.
    The arithmetic is the old per-round-checked loop's, so the rounds are the same.
    ``round_index``: this round's number (0 = first), recorded when it starts a phase.
    """
    values, final_epsilon = problem.values, problem.final_epsilon
    assignment, held_bid, prices, epsilon, phase_start, last_phase_rounds = state
    advance = (assignment >= 0).all() & (epsilon > final_epsilon)
    epsilon = torch.where(advance, torch.maximum(epsilon / EPSILON_SCALE_FACTOR, final_epsilon), epsilon)
    last_phase_rounds = torch.where(advance, round_index - phase_start, last_phase_rounds)
    phase_start = torch.where(advance, round_index, phase_start)
    bidding = (assignment < 0) | advance  # [T]

    best_two = (values - prices).topk(2, dim=1)  # [T, 2]
    best_expert = best_two.indices[:, 0]
    bids = values.gather(1, best_expert[:, None]).squeeze(1) - best_two.values[:, 1] + epsilon
    candidate_expert = torch.where(bidding, best_expert, assignment)  # holders keep their bid
    candidate_bid = torch.where(bidding, bids, held_bid)
    kept, prices = _keep_highest_bids(problem, candidate_expert, candidate_bid, prices)
    return _AuctionState(
        torch.where(kept, candidate_expert, -1), torch.where(kept, candidate_bid, 0.0), prices, epsilon,
        phase_start, last_phase_rounds,
    )


def _setup(
    scores: torch.Tensor, capacities: torch.Tensor, epsilon: float | None
) -> Tuple[_Problem, _AuctionState, torch.Tensor]:
    """``(problem, state of the first phase, scores finite [])``, all on the device.

    The first phase's epsilon is range/4 (not below the final one); all-equal scores use range
    1 (any scale works). Non-finite scores are reported by the flag, read with the first check.
    """
    values = scores.detach().to(torch.float64)
    num_tokens, device = values.shape[0], values.device
    low_high = torch.aminmax(values)
    finite = torch.isfinite(low_high.min) & torch.isfinite(low_high.max)
    score_range = low_high.max - low_high.min
    score_range = torch.where(score_range > 0, score_range, 1.0)
    if epsilon is None:
        final_epsilon = FINAL_EPSILON_FRACTION * score_range / num_tokens
    else:
        final_epsilon = torch.full((), float(epsilon), dtype=values.dtype, device=device)
    positions = torch.arange(num_tokens, device=device)
    ones = torch.ones_like(positions)
    problem = _Problem(values, capacities, capacities > 0, final_epsilon, positions, ones)
    state = _AuctionState(
        assignment=torch.full((num_tokens,), -1, dtype=torch.long, device=device),
        held_bid=torch.zeros(num_tokens, dtype=values.dtype, device=device),
        prices=torch.where(problem.usable, 0.0, torch.inf).to(values.dtype),
        epsilon=torch.maximum(score_range / EPSILON_SCALE_FACTOR, final_epsilon),
        phase_start=torch.zeros((), dtype=torch.long, device=device),
        last_phase_rounds=torch.zeros((), dtype=torch.long, device=device),
    )
    return problem, state, finite


def _capacities_on_device(scores: torch.Tensor, capacities):
    """(capacities LongTensor [N] on ``scores.device`` (balanced when None), usable experts, the
    first usable one): the common start of the exact and the approximate auction."""
    num_tokens, num_experts = scores.shape
    num_usable, first_usable = _usable_experts(capacities, num_tokens, num_experts)
    if capacities is None:
        capacities = balanced_capacities(num_tokens, num_experts, device=scores.device)
    return capacities.to(device=scores.device, dtype=torch.long), num_usable, first_usable


def balanced_assignment(
    scores: torch.Tensor,
    capacities: torch.Tensor | None = None,
    epsilon: float | None = None,
    *,
    max_rounds: int | None = None,
) -> torch.Tensor:
    """Exact balanced linear assignment of tokens to experts by an epsilon-scaled auction.

    Host syncs: one per check of the "done" flag (2 at T=2048, N=8 and 4 at T=8192, N=32 on
    the benchmark layer's scores), plus one if ``capacities`` are given on the device; the
    module docstring says why.

    Args:
        scores: ``[T, N]`` token-expert affinities (detached; any float dtype, float64 inside).
        capacities: LongTensor ``[N]`` tokens per expert, summing to T; default
            :func:`balanced_capacities`. Experts of capacity 0 receive nothing.
        epsilon: final bid increment; the total score is within ``T * epsilon`` of the optimum.
            Default ``1e-6 * (max - min score) / T``.
        max_rounds: hard cap on auction rounds over all phases (default ``100 * T + 10_000``);
            not converging within it raises ``RuntimeError``.
    Returns:
        LongTensor ``[T]`` on ``scores.device``: expert of every token, with
        ``bincount(result, minlength=N) == capacities``.
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    capacities, num_usable, first_usable = _capacities_on_device(scores, capacities)
    if epsilon is not None and not float(epsilon) > 0:
        raise ValueError(f"balanced_assignment: epsilon must be > 0, got {epsilon}")
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    if num_usable == 1:  # a single expert takes everything; the auction needs two
        return torch.full((num_tokens,), first_usable, dtype=torch.long, device=device)

    problem, state, finite = _setup(scores, capacities, epsilon)
    round_cap = 100 * num_tokens + 10_000 if max_rounds is None else int(max_rounds)
    return _run_auction(problem, state, finite, round_cap)


def _run_auction(
    problem: _Problem, state: _AuctionState, finite: torch.Tensor, round_cap: int
) -> torch.Tensor:
    """Launch rounds and check the "done" flag on the host between batches of them (one sync
    per check, :func:`rounds_before_next_check`) until done; returns the assignment ``[T]``.

    Raises ``ValueError`` (non-finite scores) or ``RuntimeError`` (not done within ``round_cap``
    rounds, no-op rounds after convergence included, so it means not converged within them).
    """
    num_tokens, num_experts = problem.values.shape
    first_epsilon = state.epsilon
    rounds_done, interval = 0, first_check_rounds(num_tokens)
    while True:
        interval = min(interval, round_cap - rounds_done)
        for round_index in range(rounds_done, rounds_done + interval):
            state = _auction_round(problem, state, round_index)
        rounds_done += interval
        done = (state.assignment >= 0).all() & (state.epsilon <= problem.final_epsilon)
        check = torch.stack([done | ~finite, finite, state.epsilon, first_epsilon, problem.final_epsilon,
                             state.phase_start, state.last_phase_rounds])  # promoted to float64
        is_done, is_finite, current, first, final, phase_start, last_phase_rounds = check.tolist()  # ONE sync
        if not is_finite:
            raise ValueError("balanced_assignment: scores must be finite")
        if is_done:
            return state.assignment
        if rounds_done >= round_cap:
            raise RuntimeError(
                f"balanced_assignment: auction did not finish within max_rounds={round_cap} rounds "
                f"(T={num_tokens}, N={num_experts}, epsilon={current:g}); scores may be "
                "degenerate or epsilon too small for their range"
            )
        epsilons = phase_epsilons(first, final)
        interval = rounds_before_next_check(
            rounds_done, interval, sum(1 for e in epsilons if e > current), len(epsilons),
            rounds_done - int(phase_start), int(last_phase_rounds),
        )


def approximate_balanced_assignment(
    scores: torch.Tensor, capacities: torch.Tensor | None = None, rounds: int = 32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced assignment from a FIXED number of auction rounds, with no host sync at all.

    Like fairseq's BASE layer (whose auction gives up after a fixed number of iterations), but
    with a stated bound: run ``rounds`` rounds of the epsilon-scaled auction of
    :func:`balanced_assignment` (no convergence check), put the tokens still unassigned into the
    free places of the experts in token order, and bound the loss by weak LP duality: for the
    auction's prices p, ``D(p) = sum_t max_i (s_ti - p_i) + sum_i c_i p_i`` is at least the
    optimum, so ``total >= optimum - gap`` with ``gap = D(p) - total >= 0``. On the benchmark
    layer's scores, 32 rounds lose 0.14 % (T=2048, N=8) and 0.10 % (T=8192, N=32) of the optimal
    total score, with bounds of 0.15 % and 0.16 %; 64 rounds 0 % and 0.04 %.
    Host syncs: none (one if ``capacities`` are given on the device, to validate them).

    Args:
        scores: ``[T, N]`` finite affinities (not checked: that would need a sync; a non-finite
            score makes ``gap`` NaN).
        capacities: as for :func:`balanced_assignment`.
        rounds: auction rounds to run.
    Returns:
        ``(assignment LongTensor [T], gap float64 [])``, both on ``scores.device``; the
        assignment is exactly balanced.
    """
    num_tokens, num_experts = scores.shape
    device = scores.device
    capacities, num_usable, first_usable = _capacities_on_device(scores, capacities)
    if num_tokens == 0 or num_usable == 1:
        assignment = torch.full((num_tokens,), first_usable, dtype=torch.long, device=device)
        return assignment, torch.zeros((), dtype=torch.float64, device=device)
    problem, state, finite = _setup(scores, capacities, None)
    for round_index in range(rounds):
        state = _auction_round(problem, state, round_index)
    assignment = _fill_free_places(problem, state.assignment)
    values, prices = problem.values, state.prices
    total = values.gather(1, assignment[:, None]).sum()
    dual = (values - prices).amax(1).sum() + torch.where(problem.usable, capacities * prices, 0.0).sum()
    return assignment, torch.where(finite, (dual - total).clamp_min(0.0), torch.nan)


def _fill_free_places(problem: _Problem, assignment: torch.Tensor) -> torch.Tensor:
    """``assignment`` [T] with its unassigned tokens (-1), in token order, given the free places
    of the experts in expert order (fixed shapes: a cumulative count and a sorted search)."""
    unassigned = assignment < 0
    held = torch.zeros_like(problem.capacities).scatter_add_(0, assignment.clamp_min(0), (~unassigned).long())
    free_end = torch.cumsum(problem.capacities - held, 0)  # [N]
    place = torch.cumsum(unassigned.long(), 0) - 1  # [T] rank among the unassigned
    fill = torch.searchsorted(free_end, place, right=True).clamp_max(problem.capacities.shape[0] - 1)
    return torch.where(unassigned, fill, assignment)


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

__all__ = [
    "balanced_capacities", "balanced_assignment", "approximate_balanced_assignment", "greedy_assignment",
    "base_routing", "ALGORITHM",
]
