"""Routing functions against plainly written loop references (one token / expert at a time).

Covers StableMoE (scores, greedy, gate, balance loss), distillation, Switch (probs, top-1, aux
loss, z-loss), hash tables, expert choice (+ causal threshold routing) and capacity dropping. BASE's
auction has its own file (test_routing_base_auction.py), the registry too (test_router_registry.py).
"""
import math
import random

import pytest
import torch

from stablemoe_megatron.routing import (
    balance_loss, capacity_keep_mask, centroid_scores, distillation_agreement, distillation_loss,
    distilled_assignment, expert_capacity, expert_capacity_per_expert, expert_choice_assignment,
    frequency_balanced_hash_table, greedy_assignment, hash_assignment,
    kth_largest_probs, random_hash_table, router_probs, sigmoid_gate, chosen_sigmoid_gate,
    switch_aux_loss, threshold_assignment, tokens_per_expert, top1, z_loss,
)

SIZES = [(1, 1), (7, 3), (16, 4), (33, 5), (64, 8)]  # (T, N), several with N not dividing T


def random_scores(num_tokens, num_experts, seed, dtype=torch.float64, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(num_tokens, num_experts, generator=generator, dtype=dtype)


# ---------------------------------------------------------------- loop references


def ref_argmax(row):
    best = 0
    for i in range(1, len(row)):
        if row[i] > row[best]:
            best = i
    return best


def ref_counts(expert_ids, num_experts):
    counts = [0] * num_experts
    for expert in expert_ids:
        counts[expert] += 1
    return counts


def ref_sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ref_balance_loss(scores, expert_ids, counts, num_tokens):
    num_experts = len(scores[0])
    mean_load = num_tokens / num_experts
    total = 0.0
    for i in range(num_experts):
        gate_sum = 0.0
        for t in range(len(scores)):
            if expert_ids[t] == i:
                gate_sum += ref_sigmoid(scores[t][i])
        total += (counts[i] - mean_load) / mean_load * gate_sum
    return total / num_tokens


def ref_log_softmax(row, index):
    top = max(row)
    log_sum = top + math.log(sum(math.exp(x - top) for x in row))
    return row[index] - log_sum


def ref_switch_aux(probs, counts, num_tokens):
    num_experts = len(probs[0])
    total = 0.0
    for i in range(num_experts):
        fraction = counts[i] / num_tokens
        mean_prob = sum(probs[t][i] for t in range(len(probs))) / num_tokens
        total += fraction * mean_prob
    return num_experts * total


def ref_z_loss(logits, num_tokens):
    total = 0.0
    for row in logits:
        top = max(row)
        total += (top + math.log(sum(math.exp(x - top) for x in row))) ** 2
    return total / num_tokens


# ---------------------------------------------------------------- StableMoE


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
def test_centroid_scores_greedy_gate_counts(num_tokens, num_experts):
    generator = torch.Generator().manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, 6, generator=generator, dtype=torch.float64)
    centroids = torch.randn(num_experts, 6, generator=generator, dtype=torch.float64)
    scores = centroid_scores(hidden, centroids)
    expert_ids = greedy_assignment(scores)
    gates = sigmoid_gate(scores, expert_ids)
    for t in range(num_tokens):
        row = [sum(hidden[t, k].item() * centroids[i, k].item() for k in range(6)) for i in range(num_experts)]
        assert scores[t].tolist() == pytest.approx(row, rel=1e-12, abs=1e-12)
        assert expert_ids[t].item() == ref_argmax(row)
        assert gates[t].item() == pytest.approx(ref_sigmoid(row[expert_ids[t].item()]), rel=1e-12)
    assert tokens_per_expert(expert_ids, num_experts).tolist() == ref_counts(expert_ids.tolist(), num_experts)


def test_centroid_scores_low_precision_in_float32():
    hidden = torch.randn(5, 4).bfloat16()
    centroids = torch.randn(3, 4).bfloat16()
    scores = centroid_scores(hidden, centroids)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, hidden.float() @ centroids.float().t())


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
def test_chosen_sigmoid_gate_equals_the_gate_from_all_scores(num_tokens, num_experts):
    """Stage 2 computes only the chosen expert's score; value and gradients as from the [T, N] scores."""
    generator = torch.Generator().manual_seed(num_tokens)
    results = []
    for full in (True, False):
        hidden = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        centroids = torch.randn(num_experts, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        hidden.requires_grad_(True)
        centroids.requires_grad_(True)
        expert_ids = torch.randint(num_experts, (num_tokens,), generator=torch.Generator().manual_seed(3))
        gates = (sigmoid_gate(centroid_scores(hidden, centroids), expert_ids) if full
                 else chosen_sigmoid_gate(hidden, centroids, expert_ids))
        upstream = torch.randn(num_tokens, generator=generator, dtype=torch.float64)
        (gates * upstream).sum().backward()
        generator = torch.Generator().manual_seed(num_tokens)
        results.append((gates.detach(), hidden.grad, centroids.grad))
    for reference, value in zip(*results):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    bf16 = chosen_sigmoid_gate(torch.randn(4, 6).bfloat16(), torch.randn(3, 6).bfloat16(), torch.tensor([0, 2, 1, 0]))
    assert bf16.dtype == torch.float32


def test_greedy_ties_pick_lowest_index():
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    assert greedy_assignment(scores).tolist() == [0, 1, 0]


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_balance_loss_matches_reference(num_tokens, num_experts, seed):
    scores = random_scores(num_tokens, num_experts, seed)
    expert_ids = greedy_assignment(scores)
    counts = ref_counts(expert_ids.tolist(), num_experts)
    expected = ref_balance_loss(scores.tolist(), expert_ids.tolist(), counts, num_tokens)
    assert balance_loss(scores, expert_ids).item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    # explicit counting set, with an arbitrary (non-greedy) assignment and bigger global totals
    random_ids = torch.randint(0, num_experts, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    global_counts = torch.tensor([c + 3 * (i + 1) for i, c in enumerate(ref_counts(random_ids.tolist(), num_experts))])
    global_total = int(global_counts.sum())
    expected = ref_balance_loss(scores.tolist(), random_ids.tolist(), global_counts.tolist(), global_total)
    for total in (global_total, torch.tensor(global_total), None):  # None: sum of given counts
        loss = balance_loss(scores, random_ids, tokens_per_expert=global_counts, num_tokens=total)
        assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_balance_loss_dtype_and_empty_batch():
    scores = random_scores(10, 4, 0, dtype=torch.bfloat16)
    assert balance_loss(scores, greedy_assignment(scores)).dtype == torch.float32
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = balance_loss(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()


def test_balance_loss_gradcheck_and_gradient_support():
    scores = random_scores(13, 4, 3).requires_grad_()
    expert_ids = greedy_assignment(scores)
    assert torch.autograd.gradcheck(lambda s: balance_loss(s, expert_ids), (scores,))
    # with counts from another counting set too
    counts = torch.tensor([10, 0, 2, 5])
    assert torch.autograd.gradcheck(lambda s: balance_loss(s, expert_ids, counts, 17), (scores,))

    balance_loss(scores, expert_ids).backward()
    grad = scores.grad
    counts = ref_counts(expert_ids.tolist(), 4)
    for t in range(13):
        for i in range(4):
            if i != expert_ids[t].item():
                assert grad[t, i].item() == 0.0  # exactly zero outside A_i
            else:
                mean_load = 13 / 4
                sig = ref_sigmoid(scores[t, i].item())
                expected = (counts[i] - mean_load) / mean_load * sig * (1 - sig) / 13
                assert grad[t, i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_balance_loss_counts_are_constants():
    scores = random_scores(8, 3, 4).requires_grad_()
    counts = torch.tensor([3.0, 3.0, 2.0], dtype=torch.float64, requires_grad=True)
    loss = balance_loss(scores, greedy_assignment(scores), tokens_per_expert=counts)
    loss.backward()
    assert counts.grad is None


# ---------------------------------------------------------------- distillation


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
def test_distillation_matches_reference(num_tokens, num_experts):
    student = random_scores(num_tokens, num_experts, 5)
    teacher = torch.randint(0, num_experts, (num_tokens,), generator=torch.Generator().manual_seed(6))
    expected = -sum(ref_log_softmax(student[t].tolist(), teacher[t].item()) for t in range(num_tokens))
    assert distillation_loss(student, teacher).item() == pytest.approx(expected / num_tokens, rel=1e-12)
    assert distillation_loss(student, teacher, num_tokens=100).item() == pytest.approx(expected / 100, rel=1e-12)
    agree = sum(ref_argmax(student[t].tolist()) == teacher[t].item() for t in range(num_tokens))
    assert distillation_agreement(student, teacher).item() == pytest.approx(agree / num_tokens)
    assert distilled_assignment(student).tolist() == [ref_argmax(row) for row in student.tolist()]


def test_distillation_gradcheck_and_detached_target():
    student = random_scores(11, 5, 7).requires_grad_()
    backbone = random_scores(11, 5, 8).requires_grad_()
    teacher = greedy_assignment(backbone)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher), (student,))
    loss = distillation_loss(student, teacher)
    loss.backward()
    assert backbone.grad is None  # the target carries no gradient into the backbone
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert not distillation_agreement(student, teacher).requires_grad
    assert distillation_agreement(student[:0], teacher[:0]).item() == 0.0


# ---------------------------------------------------------------- Switch


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
def test_switch_functions_match_reference(num_tokens, num_experts):
    logits = random_scores(num_tokens, num_experts, 9)
    probs = router_probs(logits)
    for t in range(num_tokens):
        row = logits[t].tolist()
        expected = [math.exp(ref_log_softmax(row, i)) for i in range(num_experts)]
        assert probs[t].tolist() == pytest.approx(expected, rel=1e-12)
    expert_ids, gates = top1(probs)
    assert expert_ids.tolist() == [ref_argmax(row) for row in probs.tolist()]
    assert gates.tolist() == pytest.approx([probs[t, expert_ids[t]].item() for t in range(num_tokens)])
    counts = ref_counts(expert_ids.tolist(), num_experts)
    expected = ref_switch_aux(probs.tolist(), counts, num_tokens)
    assert switch_aux_loss(probs, expert_ids).item() == pytest.approx(expected, rel=1e-12)
    assert z_loss(logits).item() == pytest.approx(ref_z_loss(logits.tolist(), num_tokens), rel=1e-12)
    assert z_loss(logits, num_tokens=50).item() == pytest.approx(ref_z_loss(logits.tolist(), 50), rel=1e-12)


def test_switch_dtypes_and_uniform_value():
    logits = torch.randn(12, 4).bfloat16()
    assert router_probs(logits).dtype == torch.float32
    assert z_loss(logits).dtype == torch.float32
    uniform = torch.full((8, 4), 0.25)
    balanced_ids = torch.arange(8) % 4
    assert switch_aux_loss(uniform, balanced_ids).item() == pytest.approx(1.0)


def test_switch_gate_and_aux_gradients_flow_through_probs_only():
    logits = random_scores(9, 3, 10).requires_grad_()
    probs = router_probs(logits)
    expert_ids, gates = top1(probs)
    (gates.sum() + switch_aux_loss(probs, expert_ids) + z_loss(logits)).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert torch.autograd.gradcheck(lambda l: switch_aux_loss(router_probs(l), expert_ids), (logits,))
    assert torch.autograd.gradcheck(lambda l: z_loss(l), (logits,))


# ---------------------------------------------------------------- partition property


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_losses_with_global_counts_sum_to_full_loss(seed):
    num_tokens, num_experts = 37, 5
    scores = random_scores(num_tokens, num_experts, seed)
    student = random_scores(num_tokens, num_experts, seed + 100)
    expert_ids = greedy_assignment(scores)
    probs = router_probs(scores)
    global_counts = tokens_per_expert(expert_ids, num_experts)
    full = {
        "balance": balance_loss(scores, expert_ids),
        "distill": distillation_loss(student, expert_ids),
        "switch": switch_aux_loss(probs, expert_ids),
        "z": z_loss(scores),
    }
    cuts = sorted(random.Random(seed).sample(range(1, num_tokens), 3))
    parts = {name: torch.zeros((), dtype=torch.float64) for name in full}
    for start, end in zip([0] + cuts, cuts + [num_tokens]):
        piece = slice(start, end)
        ids = expert_ids[piece]
        parts["balance"] += balance_loss(scores[piece], ids, global_counts, num_tokens)
        parts["distill"] += distillation_loss(student[piece], ids, num_tokens=num_tokens)
        parts["switch"] += switch_aux_loss(probs[piece], ids, global_counts, num_tokens)
        parts["z"] += z_loss(scores[piece], num_tokens=num_tokens)
    for name in full:
        torch.testing.assert_close(parts[name], full[name], rtol=1e-12, atol=1e-14, msg=name)


# ---------------------------------------------------------------- hash


def ref_greedy_table(counts, order, num_experts):
    """Visit ids in ``order``; positive counts go to the least-loaded expert (ties: lowest index)."""
    loads = [0] * num_experts
    table = [None] * len(counts)
    zero_ids = []
    for token_id in order:
        if counts[token_id] == 0:
            zero_ids.append(token_id)
            continue
        best = 0
        for expert in range(1, num_experts):
            if loads[expert] < loads[best]:
                best = expert
        table[token_id] = best
        loads[best] += counts[token_id]
    by_load = sorted(range(num_experts), key=lambda e: (loads[e], e))
    for position, token_id in enumerate(zero_ids):
        table[token_id] = by_load[position % num_experts]
    return table, loads


def zipf_counts(vocab_size, seed):
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(vocab_size, generator=generator) + 1
    return (1e3 / ranks.double()).floor().long()


@pytest.mark.parametrize("vocab_size,num_experts", [(1, 3), (10, 3), (101, 8), (1000, 16)])
def test_random_hash_table_balanced_and_deterministic(vocab_size, num_experts):
    table = random_hash_table(vocab_size, num_experts, seed=5)
    assert table.dtype == torch.long and table.shape == (vocab_size,)
    assert torch.equal(table, random_hash_table(vocab_size, num_experts, seed=5))
    ids_per_expert = ref_counts(table.tolist(), num_experts)
    assert set(ids_per_expert) <= {vocab_size // num_experts, -(-vocab_size // num_experts)}
    if vocab_size >= 100:
        assert not torch.equal(table, random_hash_table(vocab_size, num_experts, seed=6))


@pytest.mark.parametrize("seed", [0, 3])
def test_frequency_balanced_hash_table_matches_reference_greedy(seed):
    vocab_size, num_experts = 300, 7
    counts = zipf_counts(vocab_size, seed)
    counts[::13] = 5  # plenty of ties
    counts[::17] = 0
    table = frequency_balanced_hash_table(counts, num_experts, seed=seed)
    assert torch.equal(table, frequency_balanced_hash_table(counts, num_experts, seed=seed))
    random_order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed)).tolist()
    count_list = counts.tolist()
    # descending count, ties in the seeded random order (a stable sort of that order)
    order = sorted(random_order, key=lambda token_id: -count_list[token_id])
    expected, _ = ref_greedy_table(count_list, order, num_experts)
    assert table.tolist() == expected


def test_frequency_balanced_table_balances_load_better_than_random():
    vocab_size, num_experts = 30000, 8
    counts = (2e4 / (torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1)) + 1).double()).floor().long()
    assert (counts == 0).sum() > 5000  # a Zipfian sample leaves a long tail of unseen ids
    balanced = frequency_balanced_hash_table(counts, num_experts)
    uniform = random_hash_table(vocab_size, num_experts, seed=1)

    def max_over_mean(table):
        loads = [0] * num_experts
        for token_id, expert in enumerate(table.tolist()):
            loads[expert] += counts[token_id].item()
        return max(loads) / (sum(loads) / num_experts)

    assert max_over_mean(balanced) < 1.001
    assert max_over_mean(uniform) > 1.05  # the heaviest ids land together by chance
    # unseen ids are spread evenly over all experts
    zero_ids = (counts == 0).nonzero().squeeze(1)
    spread = ref_counts(balanced[zero_ids].tolist(), num_experts)
    assert max(spread) - min(spread) <= 1


def test_hash_assignment_gathers_any_shape_and_checks_range():
    table = random_hash_table(50, 4, seed=0)
    ids = torch.randint(0, 50, (3, 7))
    experts = hash_assignment(ids, table)
    assert experts.shape == (3, 7)
    assert experts.tolist() == [[table[i].item() for i in row] for row in ids.tolist()]
    with pytest.raises(ValueError, match="token ids must lie in"):
        hash_assignment(torch.tensor([0, 50]), table, check=True)
    with pytest.raises(ValueError, match="token ids must lie in"):
        hash_assignment(torch.tensor([-1, 3]), table, check=True)


# ---------------------------------------------------------------- expert choice


def test_expert_capacity_formula():
    assert expert_capacity(100, 8, 2.0) == 25
    assert expert_capacity(10, 4, 1.0) == 3  # 2.5 rounds half up
    assert expert_capacity(9, 4, 1.0) == 2  # 2.25
    assert expert_capacity(3, 64, 1.0) == 1  # at least one token
    assert expert_capacity(10, 2, 4.0) == 10  # at most T
    for num_tokens, num_experts, factor in [(37, 5, 2.0), (64, 8, 1.25), (1, 1, 1.0)]:
        exact = num_tokens * factor / num_experts
        assert expert_capacity(num_tokens, num_experts, factor) == max(1, min(num_tokens, math.floor(exact + 0.5)))


def ref_expert_choice(probs, k):
    pairs = []
    for i in range(len(probs[0])):
        ranked = sorted(range(len(probs)), key=lambda t: -probs[t][i])
        pairs += [(t, i, probs[t][i]) for t in ranked[:k]]
    return pairs


def ref_threshold(probs, thresholds):
    return [(t, i, probs[t][i]) for i in range(len(probs[0])) for t in range(len(probs))
            if probs[t][i] >= thresholds[i]]


def as_pairs(token_index, expert_index, gates):
    return list(zip(token_index.tolist(), expert_index.tolist(), gates.tolist()))


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
def test_expert_choice_and_threshold_match_reference(num_tokens, num_experts):
    probs = router_probs(random_scores(num_tokens, num_experts, 11))
    k = expert_capacity(num_tokens, num_experts, 2.0)
    assert as_pairs(*expert_choice_assignment(probs, k)) == ref_expert_choice(probs.tolist(), k)
    kth = kth_largest_probs(probs, k)
    assert kth.tolist() == [sorted(probs[:, i].tolist(), reverse=True)[k - 1] for i in range(num_experts)]
    thresholds = torch.rand(num_experts, generator=torch.Generator().manual_seed(1)) / num_experts
    assert as_pairs(*threshold_assignment(probs, thresholds)) == ref_threshold(probs.tolist(), thresholds.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_with_batch_kth_contains_expert_choice(seed):
    """Every pair picked by expert choice has prob >= that expert's k-th largest prob, so it is
    also picked by threshold routing with those thresholds; each expert then gets >= k tokens
    (exactly k here, continuous random probabilities have no ties)."""
    probs = router_probs(random_scores(40, 6, seed))
    k = expert_capacity(40, 6, 2.0)
    chosen = set(as_pairs(*expert_choice_assignment(probs, k)))
    token_index, expert_index, gates = threshold_assignment(probs, kth_largest_probs(probs, k))
    assert chosen <= set(as_pairs(token_index, expert_index, gates))
    assert ref_counts(expert_index.tolist(), 6) == [k] * 6


def test_threshold_routing_is_causal_and_expert_choice_is_not():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    thresholds = torch.full((4,), 0.3, dtype=torch.float64)

    def experts_of_prefix(routing_pairs, prefix):
        token_index, expert_index, _ = routing_pairs
        return sorted((t, i) for t, i in zip(token_index.tolist(), expert_index.tolist()) if t < prefix)

    leaks = 0
    for trial in range(10):
        changed = logits.clone()
        changed[15:] = 5 * torch.randn(15, 4, generator=generator, dtype=torch.float64)
        before, after = router_probs(logits), router_probs(changed)
        assert experts_of_prefix(threshold_assignment(before, thresholds), 15) == \
            experts_of_prefix(threshold_assignment(after, thresholds), 15)
        leaks += experts_of_prefix(expert_choice_assignment(before, 8), 15) != \
            experts_of_prefix(expert_choice_assignment(after, 8), 15)
    assert leaks > 0  # the documented look-ahead of expert choice in training


def test_expert_choice_gates_differentiable():
    logits = random_scores(12, 3, 12).requires_grad_()
    probs = router_probs(logits)
    _, _, gates = expert_choice_assignment(probs, 4)
    _, _, threshold_gates = threshold_assignment(probs, kth_largest_probs(probs, 4))
    (gates.sum() + threshold_gates.sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert not kth_largest_probs(probs, 4).requires_grad


# ---------------------------------------------------------------- capacity


def ref_keep_mask(expert_ids, priority, num_experts, capacity):
    keep = [False] * len(expert_ids)
    for i in range(num_experts):
        mine = [t for t in range(len(expert_ids)) if expert_ids[t] == i]
        mine.sort(key=lambda t: (-priority[t], t))
        for t in mine[:capacity]:
            keep[t] = True
    return keep


def test_expert_capacity_per_expert_formula():
    assert expert_capacity_per_expert(100, 10, 1.1) == 11  # not 12 from float noise
    assert expert_capacity_per_expert(10, 4, 1.0) == 3
    assert expert_capacity_per_expert(8, 4, 1.0) == 2
    assert expert_capacity_per_expert(37, 5, 1.5) == math.ceil(37 * 1.5 / 5)
    with pytest.raises(ValueError):
        expert_capacity_per_expert(10, 4, 0.0)


@pytest.mark.parametrize("num_tokens,num_experts", SIZES)
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5])
def test_capacity_keep_mask_matches_reference(num_tokens, num_experts, factor):
    generator = torch.Generator().manual_seed(num_tokens)
    expert_ids = torch.randint(0, num_experts, (num_tokens,), generator=generator)
    priority = torch.randint(0, 4, (num_tokens,), generator=generator).float()  # many ties
    capacity = expert_capacity_per_expert(num_tokens, num_experts, factor)
    keep = capacity_keep_mask(expert_ids, priority, num_experts, capacity)
    assert keep.dtype == torch.bool
    assert keep.tolist() == ref_keep_mask(expert_ids.tolist(), priority.tolist(), num_experts, capacity)
    assert capacity_keep_mask(expert_ids, priority, num_experts, 0).sum() == 0
