"""BASE layer's balanced assignment (auction) against scipy's exact linear_sum_assignment.

An expert of capacity c is expanded into c identical slots, which turns the balanced problem
into a square assignment problem that scipy solves exactly; the auction must be exactly
balanced and reach the same optimum (up to its T * epsilon guarantee).
"""
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
