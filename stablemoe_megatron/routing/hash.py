"""Hash layer routing (Roller et al., NeurIPS 2021), one of the paper's baselines: a fixed token-id -> expert table.

The assignment ``a_t = table[x_t]`` depends on the token id alone, is never trained, and has
gate 1. Two tables:

* :func:`random_hash_table`: a seeded random table balanced over ids (each expert gets the
  floor or ceil of V/N ids). Built on CPU with ``torch.Generator().manual_seed(seed)``, so it is
  the same on every machine for a given torch version (it is also worth saving with the model).
* :func:`frequency_balanced_hash_table`: Roller et al.'s balanced variant: ids are placed in
  descending frequency, each on the expert with the least frequency mass so far (greedy
  longest-processing-time bin packing), so that token LOAD, not id count, is balanced.

Tables are built once, on the host (Python loops over the vocabulary are fine); the per-token
path is :func:`hash_assignment`, a gather.
"""
from __future__ import annotations

import heapq

import torch

from .registry import RoutingAlgorithm, StateBuffer, register_routing


def random_hash_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """A fixed random table, balanced over ids: LongTensor ``[V]`` on CPU.

    A seeded random permutation of the ids is dealt round-robin to the experts, so every expert
    gets ``floor(V/N)`` or ``ceil(V/N)`` ids. Deterministic for a given seed (CPU generator).
    """
    if vocab_size <= 0 or num_experts <= 0:
        raise ValueError(f"need vocab_size > 0 and num_experts > 0, got {vocab_size}, {num_experts}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(vocab_size, generator=generator)
    table = torch.empty(vocab_size, dtype=torch.long)
    table[permutation] = torch.arange(vocab_size) % num_experts
    return table


def frequency_balanced_hash_table(
    token_counts: torch.Tensor, num_experts: int, seed: int = 0
) -> torch.Tensor:
    """A table that balances token frequency mass over experts: LongTensor ``[V]`` on CPU.

    Args:
        token_counts: ``[V]`` non-negative counts of each id in a training sample.
        num_experts: N.
        seed: breaks ties between equal counts (a seeded random order of the ids).
    Returns:
        ``table[v]`` = expert of id v. Ids with a positive count are visited in descending count
        (ties in the seeded random order) and each goes to the expert with the least total count
        so far (ties: lowest expert index). Ids with zero count add no load; they are dealt
        round-robin, in the seeded random order, starting from the least-loaded expert (experts
        ordered by load, ties by index), so unseen ids are also spread evenly.
    """
    counts = token_counts.detach().to("cpu", torch.long).reshape(-1)
    if num_experts <= 0 or bool((counts < 0).any()):
        raise ValueError("need num_experts > 0 and non-negative token_counts")
    vocab_size = counts.numel()
    generator = torch.Generator().manual_seed(seed)
    random_order = torch.randperm(vocab_size, generator=generator)
    by_count = torch.sort(counts[random_order], descending=True, stable=True).indices
    visit_order = random_order[by_count].tolist()
    count_list = counts.tolist()

    table = [0] * vocab_size
    heap = [(0, expert) for expert in range(num_experts)]  # (load, expert): least load, lowest index
    zero_ids = []
    for token_id in visit_order:
        if count_list[token_id] == 0:
            zero_ids.append(token_id)
            continue
        load, expert = heapq.heappop(heap)
        table[token_id] = expert
        heapq.heappush(heap, (load + count_list[token_id], expert))
    experts_by_load = [expert for _, expert in sorted(heap)]
    for position, token_id in enumerate(zero_ids):
        table[token_id] = experts_by_load[position % num_experts]
    return torch.tensor(table, dtype=torch.long)


def hash_assignment(token_ids: torch.Tensor, table: torch.Tensor, check: bool = False) -> torch.Tensor:
    """Expert of every token: ``table[token_ids]``, same shape as ``token_ids`` (LongTensor).

    Keep ``table`` on the ids' device (it is moved here otherwise, a copy per call). Ids must lie
    in ``[0, V)``: out-of-range ids raise ``IndexError`` on CPU and a device-side assert on CUDA,
    and negative ids would silently wrap around. ``check=True`` validates the range first and
    raises ``ValueError`` (costs a host sync; use it in tests or data checks, not per step).
    """
    table = table.to(token_ids.device)
    if check and token_ids.numel() > 0:
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= table.numel():
            raise ValueError(
                f"token ids must lie in [0, {table.numel()}) (the hash table's vocabulary), "
                f"got range [{low}, {high}]"
            )
    return table[token_ids]


def hash_eval_routing(hidden, weight=None, token_ids=None, state=None, expert_ids=None):
    """Evaluation routing (the same as in training): ``table[token id]``, gate 1.

    Args:
        hidden: ``[T, d]`` (only its size and device are used); weight, expert_ids: unused;
        token_ids: ``[T]``; state: ``{"hash_table": [V] long}``.
    Returns:
        ``(arange(T), expert_index [T], gates [T] = 1)``.
    """
    tokens = torch.arange(hidden.shape[0], device=hidden.device)
    gates = torch.ones(hidden.shape[0], device=hidden.device)
    return tokens, hash_assignment(token_ids, state["hash_table"]), gates


ALGORITHM = register_routing(RoutingAlgorithm(
    name="hash",
    description="Hash layer: fixed token-id -> expert table (random, or balanced by token "
    "frequency), gate 1, no router parameters",
    adapter="hash-table",
    gate="none",
    learned=False,
    one_pair_per_token=True,
    uses_token_ids=True,
    table_from_training_data=True,
    state_buffers=(StateBuffer("hash_table", "vocab", "long"),),
    train_routing=hash_assignment,
    eval_routing=hash_eval_routing,
))
