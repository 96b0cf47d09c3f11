"""BASE layer's balanced assignment (auction) against scipy's exact linear_sum_assignment.

An expert of capacity c is expanded into c identical slots, which turns the balanced problem
into a square assignment problem that scipy solves exactly; the auction must be exactly
balanced and reach the same optimum (up to its T * epsilon guarantee), also with ties and
unequal (zero) capacities, and give the same assignment as the per-round-checked loop it
replaced. Host syncs (bench/common.py's HostSyncCounter): one per check of the "done" flag, at
most 8 per forward of bench/moe_layer.py's BASE layer at both of its sizes, and the result does
not depend on when the host checks. The approximate mode (fixed rounds) makes no sync and stays
within its duality bound of scipy's optimum.
"""
import os
import sys
import time

import numpy as np
import pytest
import torch

scipy_optimize = pytest.importorskip("scipy.optimize")

from stablemoe_megatron.routing import balanced_assignment, balanced_capacities  # noqa: E402
from stablemoe_megatron.routing.base import greedy_assignment  # noqa: E402


def optimum(scores, capacities):
    """Exact maximum of sum_t scores[t, a_t] with expert i taking capacities[i] tokens (scipy)."""
    slot_expert = np.repeat(np.arange(scores.shape[1]), capacities.tolist())
    expanded = scores.double().numpy()[:, slot_expert]
    rows, cols = scipy_optimize.linear_sum_assignment(expanded, maximize=True)
    return float(expanded[rows, cols].sum())


def total_score(scores, assignment):
    return float(sum(scores[t, assignment[t]].item() for t in range(scores.shape[0])))


def counts(assignment, num_experts):
    result = [0] * num_experts
    for expert in assignment.tolist():
        result[expert] += 1
    return result


def test_balanced_capacities():
    assert balanced_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert balanced_capacities(8, 4).tolist() == [2, 2, 2, 2]
    assert balanced_capacities(2, 4).tolist() == [1, 1, 0, 0]
    assert balanced_capacities(0, 3).tolist() == [0, 0, 0]
    for num_tokens in range(30):
        capacities = balanced_capacities(num_tokens, 7)
        assert capacities.dtype == torch.long and int(capacities.sum()) == num_tokens
        assert int(capacities.max() - capacities.min()) <= 1


@pytest.mark.parametrize("seed", range(12))
def test_auction_is_balanced_and_optimal_on_small_instances(seed):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 25, (1,), generator=generator))
    num_experts = int(torch.randint(2, 5, (1,), generator=generator))
    scores = torch.randn(num_tokens, num_experts, generator=generator)
    assignment = balanced_assignment(scores)
    capacities = balanced_capacities(num_tokens, num_experts)
    assert assignment.dtype == torch.long and assignment.shape == (num_tokens,)
    assert counts(assignment, num_experts) == capacities.tolist()
    best = optimum(scores, capacities)
    assert total_score(scores, assignment) == pytest.approx(best, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("num_tokens,num_experts", [(24, 4), (23, 4), (9, 2), (20, 3), (17, 3)])
def test_auction_matches_scipy_across_sizes(num_tokens, num_experts):
    for seed in range(3):
        scores = torch.rand(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
        assignment = balanced_assignment(scores)
        capacities = balanced_capacities(num_tokens, num_experts)
        assert counts(assignment, num_experts) == capacities.tolist()
        best = optimum(scores, capacities)
        assert total_score(scores, assignment) == pytest.approx(best, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("capacity_list", [[5, 0, 7, 4], [0, 0, 16, 0], [1, 1, 1, 13], [16, 0, 0, 0]])
def test_custom_capacities_including_zero(capacity_list):
    scores = torch.randn(16, 4, generator=torch.Generator().manual_seed(sum(capacity_list[:2])))
    capacities = torch.tensor(capacity_list)
    assignment = balanced_assignment(scores, capacities)
    assert counts(assignment, 4) == capacity_list
    best = optimum(scores, capacities)
    assert total_score(scores, assignment) == pytest.approx(best, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("epsilon", [0.5, 0.05])
def test_coarse_epsilon_is_within_t_epsilon(epsilon):
    num_tokens = 20
    scores = torch.rand(num_tokens, 4, generator=torch.Generator().manual_seed(3))
    assignment = balanced_assignment(scores, epsilon=epsilon)
    best = optimum(scores, balanced_capacities(num_tokens, 4))
    assert counts(assignment, 4) == balanced_capacities(num_tokens, 4).tolist()
    assert total_score(scores, assignment) >= best - num_tokens * epsilon - 1e-9


@pytest.mark.parametrize(
    "scores",
    [
        torch.zeros(12, 3),  # everything tied
        torch.ones(10, 4) * 7.5,
        torch.randint(0, 2, (24, 4)).float(),  # integer scores, many ties
        torch.tensor([[1.0, 0.0, 0.0]]).repeat(9, 1),  # every token wants the same expert
        torch.randn(1, 4).repeat(20, 1),  # identical tokens
    ],
    ids=["zeros", "constant", "binary", "same-favourite", "identical-rows"],
)
def test_degenerate_inputs_terminate_balanced_and_optimal(scores):
    num_tokens, num_experts = scores.shape
    assignment = balanced_assignment(scores)
    capacities = balanced_capacities(num_tokens, num_experts)
    assert counts(assignment, num_experts) == capacities.tolist()
    assert total_score(scores, assignment) == pytest.approx(optimum(scores, capacities), rel=1e-6, abs=1e-6)


def test_trivial_sizes_and_dtypes():
    assert balanced_assignment(torch.zeros(0, 4)).shape == (0,)
    assert balanced_assignment(torch.randn(5, 1)).tolist() == [0] * 5
    assert balanced_assignment(torch.randn(3, 5)).unique().numel() == 3  # T < N: 3 experts, 1 each
    low = torch.randn(32, 4).bfloat16()
    assignment = balanced_assignment(low)
    assert counts(assignment, 4) == [8] * 4
    assert total_score(low.double(), assignment) == pytest.approx(
        optimum(low.double(), balanced_capacities(32, 4)), rel=1e-6, abs=1e-6
    )


def test_large_instance_is_fast_and_balanced():
    scores = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    assignment = balanced_assignment(scores)
    elapsed = time.perf_counter() - start
    assert counts(assignment, 8) == [64] * 8
    assert elapsed < 3.0, f"T=512, N=8 auction took {elapsed:.2f} s"
    # balancing costs score relative to greedy, but never beats it
    greedy = greedy_assignment(scores)
    assert total_score(scores, assignment) <= total_score(scores, greedy) + 1e-9


def test_errors():
    scores = torch.randn(10, 3)
    with pytest.raises(ValueError, match="sum to the number of tokens 10"):
        balanced_assignment(scores, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="non-negative"):
        balanced_assignment(scores, torch.tensor([11, -1, 0]))
    with pytest.raises(ValueError, match="shape"):
        balanced_assignment(scores, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="finite"):
        balanced_assignment(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="epsilon"):
        balanced_assignment(scores, epsilon=0.0)
    with pytest.raises(RuntimeError, match="max_rounds=1"):
        balanced_assignment(torch.randn(64, 4), max_rounds=1)


@pytest.mark.parametrize("num_tokens,num_experts", [(200, 8), (150, 7)])
def test_auction_matches_scipy_on_medium_instances(num_tokens, num_experts):
    scores = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_tokens))
    assignment = balanced_assignment(scores)
    capacities = balanced_capacities(num_tokens, num_experts)
    assert counts(assignment, num_experts) == capacities.tolist()
    best = optimum(scores, capacities)
    assert total_score(scores, assignment) == pytest.approx(best, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# device-resident auction: host syncs, exactness, independence from the check schedule
# ------------------------------------------------------------------------------------------------
# Assignments of the per-round-checked loop this file tested before the auction moved onto the
# device (kept verbatim; both are the scipy optimum, asserted below).
OLD_RESULT_96x6 = "243322000101311502202014334205342504435524112131345541542520320342015323233415055411534504001154"
OLD_RESULT_40x5 = "4202330333333030303343433304302030030304"


def test_same_assignment_as_the_per_round_loop_on_fixed_seeds():
    scores = torch.randn(96, 6, generator=torch.Generator().manual_seed(2024))
    assignment = balanced_assignment(scores)
    assert "".join(map(str, assignment.tolist())) == OLD_RESULT_96x6
    assert total_score(scores, assignment) == pytest.approx(optimum(scores, balanced_capacities(96, 6)), abs=1e-9)

    scores = torch.rand(40, 5, generator=torch.Generator().manual_seed(2025))
    capacities = torch.tensor([12, 0, 3, 20, 5])
    assignment = balanced_assignment(scores, capacities)
    assert "".join(map(str, assignment.tolist())) == OLD_RESULT_40x5
    assert total_score(scores, assignment) == pytest.approx(optimum(scores, capacities), abs=1e-9)


def random_capacities(num_tokens, num_experts, generator):
    """A random composition of T into N non-negative parts (zeros and unequal sizes included)."""
    cuts = torch.randint(0, num_tokens + 1, (num_experts - 1,), generator=generator).sort().values
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([num_tokens])])
    return bounds[1:] - bounds[:-1]


def random_instance(seed):
    """Scores (continuous, integer with many ties, or rounded to one decimal) and capacities."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 61, (1,), generator=generator))
    num_experts = int(torch.randint(2, 7, (1,), generator=generator))
    kind = seed % 3
    if kind == 0:
        scores = torch.randn(num_tokens, num_experts, generator=generator)
    elif kind == 1:
        scores = torch.randint(0, 3, (num_tokens, num_experts), generator=generator).float()
    else:
        scores = (torch.rand(num_tokens, num_experts, generator=generator) * 10).round() / 10
    return scores, random_capacities(num_tokens, num_experts, generator)


@pytest.mark.parametrize("seed", range(24))
def test_exact_against_scipy_with_ties_and_unequal_capacities(seed):
    scores, capacities = random_instance(seed)
    assignment = balanced_assignment(scores, capacities)
    assert counts(assignment, scores.shape[1]) == capacities.tolist()
    assert total_score(scores, assignment) == pytest.approx(optimum(scores, capacities), rel=1e-6, abs=1e-6)


def test_result_does_not_depend_on_the_check_schedule(monkeypatch):
    """Checking after every round (the old loop's schedule) gives the same assignment: rounds after
    convergence change nothing."""
    from stablemoe_megatron.routing import base

    instances = [random_instance(seed) for seed in range(6)]
    instances.append((torch.randn(300, 8, generator=torch.Generator().manual_seed(5)), None))
    default = [balanced_assignment(s, c) for s, c in instances]
    monkeypatch.setattr(base, "first_check_rounds", lambda num_tokens: 1)
    monkeypatch.setattr(base, "rounds_before_next_check", lambda *args: 1)
    every_round = [balanced_assignment(s, c) for s, c in instances]
    for a, b in zip(default, every_round):
        assert torch.equal(a, b)


def test_rounds_after_convergence_are_no_ops():
    from stablemoe_megatron.routing import base

    scores = torch.randn(200, 8, generator=torch.Generator().manual_seed(11))
    problem, state, _ = base._setup(scores, balanced_capacities(200, 8), None)
    for round_index in range(10_000):
        state = base._auction_round(problem, state, round_index)
        if bool((state.assignment >= 0).all() & (state.epsilon <= problem.final_epsilon)):
            break
    converged = state
    for extra in range(5):
        state = base._auction_round(problem, state, round_index + 1 + extra)
    for before, after in zip(converged, state):
        assert torch.equal(before, after)
    assert torch.equal(converged.assignment, balanced_assignment(scores))


def test_check_schedule_doubles_or_estimates_the_phases_left():
    from stablemoe_megatron.routing.base import default_phase_count, first_check_rounds, rounds_before_next_check

    assert [default_phase_count(t) for t in (64, 2048, 8192)] == [13, 16, 17]
    assert first_check_rounds(2048) == 32
    # no phase completed yet: double (or the rounds run so far, if more)
    assert rounds_before_next_check(32, 32, 0, 16, 32, 0) == 64
    assert rounds_before_next_check(40, 4, 3, 16, 2, 0) == 40
    # 3 phases left after the current one, at 5 rounds each, 2 rounds into the current: 3 + 15
    assert rounds_before_next_check(96, 64, 12, 16, 2, 5) == 18
    # a long last phase: the estimate exceeds the doubling, which wins
    assert rounds_before_next_check(32, 32, 2, 16, 10, 30) == 64


def _bench_path():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)


def count_syncs_of(fn, *args, **kwargs):
    """Host syncs of ``fn(*args)`` as bench/common.py's HostSyncCounter counts them (what would
    block the host on a GPU: reads to the host, nonzero, boolean-mask indexing ...)."""
    _bench_path()
    from bench.common import count_host_syncs

    with count_host_syncs() as counter:
        result = fn(*args, **kwargs)
    return result, counter


def test_host_syncs_one_per_check_plus_one_for_device_capacities():
    scores = torch.randn(256, 8, generator=torch.Generator().manual_seed(3)) * 0.1
    assignment, counter = count_syncs_of(balanced_assignment, scores)
    assert set(counter.events) == {"tolist"} and 1 <= counter.count <= 4, counter.events
    capacities = balanced_capacities(256, 8)  # made outside the counter: a device tensor to it
    again, with_capacities = count_syncs_of(balanced_assignment, scores, capacities)
    assert torch.equal(again, assignment)
    assert with_capacities.count == counter.count + 1


def _base_layer_syncs(preset, overrides):
    """(host syncs, their ops) of one training forward of bench/moe_layer.py's BASE layer."""
    _bench_path()
    from bench import moe_layer

    sizes = dict(moe_layer.PRESETS[preset], **overrides)
    layer = moe_layer.build_our_layer(sizes, "base")
    inputs = moe_layer.make_inputs(sizes)
    syncs, ops, _ = moe_layer.count_syncs(layer, "base", inputs)
    return syncs, ops


@pytest.mark.parametrize(
    "preset,overrides",
    [("cpu", {}), ("paper", {"ffn": 64})],  # the FFN size does not touch routing; 64 keeps the test light
    ids=["d256-8experts-2048tokens", "d768-32experts-8192tokens"],
)
def test_bench_base_layer_makes_at_most_8_host_syncs_per_call(preset, overrides):
    from distributed import run_distributed

    syncs, ops = run_distributed(_base_layer_syncs, world_size=1, args=(preset, overrides), timeout=300)[0]
    assert syncs <= 8, ops
    assert "nonzero" not in ops and "bool-mask" not in ops, ops


# ------------------------------------------------------------------------------------------------
# approximate mode: a fixed number of rounds, no host sync, a duality bound on the loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("rounds", [3, 12])
def test_approximate_mode_is_balanced_and_within_its_bound(seed, rounds):
    from stablemoe_megatron.routing.base import approximate_balanced_assignment

    scores, capacities = random_instance(seed)
    (assignment, gap), counter = count_syncs_of(approximate_balanced_assignment, scores, capacities, rounds)
    assert counter.count == 1  # validating the given capacities; none with the default ones
    assert counts(assignment, scores.shape[1]) == capacities.tolist()
    best = optimum(scores, capacities)
    total = total_score(scores, assignment)
    assert 0.0 <= float(gap) and best - float(gap) - 1e-9 <= total <= best + 1e-9


def test_approximate_mode_without_syncs_and_exact_when_converged():
    from stablemoe_megatron.routing.base import approximate_balanced_assignment

    scores = torch.randn(300, 8, generator=torch.Generator().manual_seed(8)) * 0.1
    (assignment, gap), counter = count_syncs_of(approximate_balanced_assignment, scores, None, 16)
    assert counter.count == 0, counter.events
    assert counts(assignment, 8) == balanced_capacities(300, 8).tolist()
    best = optimum(scores, balanced_capacities(300, 8))
    assert best - float(gap) - 1e-9 <= total_score(scores, assignment) < best  # 16 rounds: not yet optimal
    # enough rounds to converge: the exact assignment, and the bound is T * final epsilon = 1e-6 * range
    assignment, gap = approximate_balanced_assignment(scores, rounds=2000)
    assert torch.equal(assignment, balanced_assignment(scores))
    assert float(gap) <= 1e-6 * float(scores.max() - scores.min()) + 1e-12
    # non-finite scores cannot be checked without a sync: the bound says so
    scores[3, 2] = float("nan")
    assert approximate_balanced_assignment(scores, rounds=4)[1].isnan()
