"""Token dispatcher: send (token, expert) pairs to the ranks that hold the experts, and back.

The routers produce *pairs* rather than a dense routing map: ``token_index[A]`` and
``expert_index[A]`` (global expert ids) with ``gates[A]``. Top-1 routing gives one pair per token
(fewer when tokens are dropped by capacity), top-k routing (``--moe-router-topk``) k pairs per
token (token-major, fewer after dropping), Expert Choice k pairs per expert (a token may appear
0..N times). One mechanism serves all of them:

1. sort the pairs by expert (stable) and gather the hidden states: ``[A, h]``;
2. expert parallelism: experts are sharded contiguously over the EP ranks (rank r holds experts
   ``r*L .. r*L+L-1``), so the sorted pairs are already grouped by destination rank; one
   all-to-all (megatron-core's differentiable ``all_to_all``) exchanges them, and the received
   rows, ordered (source rank, local expert), are regrouped to (local expert, source rank) so
   each local expert's tokens are contiguous;
3. the experts run on ``tokens_per_local_expert`` (a CPU tensor, as megatron's expert MLPs need);
4. ``combine`` inverts 2, multiplies by the gates and sums into the token rows (``index_add``):
   a token with several pairs (top-k, Expert Choice) gets the gate-weighted sum of its experts'
   outputs, and its hidden state's gradient the sum over its pairs (the backward of the gather in
   1); a token routed nowhere (dropped, or unpicked by Expert Choice) gets zeros: its residual only.

When every token has exactly one pair (``one_pair_per_token``: top-1 routing without dropping,
hash, StableMoE stage 2), the sort is a permutation P of the tokens: dispatch is ``x[P]`` and
combine ``y[P^-1] * g``, each a gather whose backward is the inverse gather (no zero fill and
no scatter-add, which the general path needs in both directions). Same values, bit for bit.

Dropped pairs (expert capacity, training only) are not removed by the router, which would take a
boolean mask and so a device sync; they carry the expert id N ("no expert"), sort after every
expert's pairs and are cut off with the host count of kept pairs. The permutation path then still
applies: a dropped token's combined row is zero.

Device-to-host synchronisation: the split sizes of the all-to-all and the per-expert counts must be
host integers. With learned routing they are computed on the device and copied once per layer
call (one sync). When the caller already knows the counts on the host (``host_tokens_per_expert``:
StableMoE stage 2, distilled top-k stage 2 and hash routing, whose experts are a function of the
token id and are computed from the CPU copy of the batch), there is no device-to-host copy at all; under EP the ranks exchange their
host counts over a CPU (gloo) group instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from stablemoe_megatron.routing.common import tokens_per_expert


@dataclass
class DispatchState:
    """What ``combine`` needs to undo ``dispatch``."""

    sorted_token_index: Optional[torch.Tensor]  # [A] token row of each pair, pairs sorted by expert
    order: torch.Tensor  # [A] pair permutation applied by the sort
    num_tokens: int
    tokens_per_local_expert: torch.Tensor  # [L] CPU long
    input_splits: Optional[List[int]] = None  # EP: rows sent to each rank
    output_splits: Optional[List[int]] = None  # EP: rows received from each rank
    regroup: Optional[torch.Tensor] = None  # [R] received (src, expert) order -> (expert, src)
    ungroup: Optional[torch.Tensor] = None  # inverse of regroup
    inverse: Optional[torch.Tensor] = None  # [T] inverse of ``order`` (one pair per token only)
    kept: int = 0  # pairs sent to an expert (the rest, dropped by the capacity, sort last)


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward is the gather by its ``inverse``."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _rows_to_tokens(rows: torch.Tensor, inverse: torch.Tensor, kept: int) -> torch.Tensor:
    """[T, h] token rows from ``rows`` [kept, h] (sorted pairs, dropped pairs last and absent):
    token t gets ``rows[inverse[t]]``, or zeros when its pair was dropped (``inverse[t] >= kept``)."""
    if kept == inverse.numel():
        return rows.index_select(0, inverse)
    padded = torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])
    return padded.index_select(0, inverse.clamp(max=kept))


class _DispatchRows(torch.autograd.Function):
    """``x[order[:kept]]``: the token rows [kept, h] of the kept pairs, sorted by expert.

    ``order`` [T] is a permutation (one pair per token, dropped pairs sorted last), ``inverse`` its
    inverse. The backward is one gather by ``inverse`` (a dropped token's gradient is zero).
    """

    @staticmethod
    def forward(ctx, x, order, inverse, kept: int):
        ctx.save_for_backward(inverse)
        ctx.kept = kept
        return x.index_select(0, order if kept == order.numel() else order[:kept])

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _rows_to_tokens(grad, inverse, ctx.kept), None, None, None


class _GatedCombine(torch.autograd.Function):
    """``y[order^-1] * gates``: expert outputs [kept, h] back in token order [T, h], weighted.

    A dropped token's row is zero (so is its gate's gradient). The backward gathers the output
    gradient by ``order`` once and gets both gradients from it: ``dL/dy = G * g`` and
    ``dL/dg = <G, y>`` row-wise (in fp32), without keeping the [T, h] token rows of the forward.
    """

    @staticmethod
    def forward(ctx, y, gates, order, inverse):
        kept = y.shape[0]
        out = _rows_to_tokens(y, inverse, kept)
        out.mul_(gates.to(out.dtype).unsqueeze(-1))
        ctx.save_for_backward(y, gates, order)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, gates, order = ctx.saved_tensors
        kept = y.shape[0]
        rows = order if kept == order.numel() else order[:kept]
        sorted_grad = grad.index_select(0, rows)  # [kept, h]
        grad_gates = None
        if ctx.needs_input_grad[1]:
            dtype = torch.promote_types(gates.dtype, torch.float32)
            per_pair = torch.linalg.vecdot(sorted_grad.to(dtype), y.to(dtype))
            grad_gates = torch.zeros_like(gates).index_copy_(0, rows, per_pair.to(gates.dtype))
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = sorted_grad.mul_(gates.index_select(0, rows).to(sorted_grad.dtype).unsqueeze(-1))
        return grad_y, grad_gates, None, None


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).scatter_(0, order, positions)


def device_to_host_copies() -> int:
    """Number of device-to-host copies the dispatchers made in this process (for benchmarks)."""
    return _D2H_COPIES[0]


_D2H_COPIES = [0]


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        _D2H_COPIES[0] += 1
    return tensor.cpu()


def _regroup_indices(recv_counts: np.ndarray):
    """Row permutations between (source rank, local expert) order and (local expert, source rank).

    ``recv_counts[s, e]`` rows for local expert e arrive from source rank s, source-major.
    """
    ep, local = recv_counts.shape
    offsets = np.concatenate([[0], np.cumsum(recv_counts.reshape(-1))])[:-1].reshape(ep, local)
    regroup = np.concatenate(
        [np.arange(offsets[s, e], offsets[s, e] + recv_counts[s, e]) for e in range(local) for s in range(ep)]
        or [np.zeros(0, dtype=np.int64)]
    ).astype(np.int64)
    ungroup = np.empty_like(regroup)
    ungroup[regroup] = np.arange(regroup.size, dtype=np.int64)
    return torch.from_numpy(regroup), torch.from_numpy(ungroup)


class AllToAllDispatcher:
    """Expert-parallel all-to-all dispatcher for routing pairs (works under gloo and NCCL).

    Args:
        num_experts: N, global.
        ep_group: the expert-parallel process group (``None`` or size 1: no communication).
        host_ep_group: a CPU-capable (gloo) group over the same ranks, used to exchange host
            counts without a device sync; defaults to ``ep_group`` when that is a gloo group.
    """

    def __init__(self, num_experts: int, ep_group=None, host_ep_group=None):
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = ep_group.size() if ep_group is not None else 1
        self.ep_rank = ep_group.rank() if ep_group is not None else 0
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts cannot be sharded over {self.ep_size} EP ranks")
        self.num_local_experts = num_experts // self.ep_size
        self.host_ep_group = host_ep_group

    # ------------------------------------------------------------------------------------------
    def dispatch(self, hidden: torch.Tensor, token_index: torch.Tensor, expert_index: torch.Tensor,
                 host_tokens_per_expert: Optional[torch.Tensor] = None, one_pair_per_token: bool = False,
                 row_order: Optional[torch.Tensor] = None):
        """Return (expert_input [R, h] grouped by local expert, DispatchState).

        hidden: [T, h]; token_index, expert_index: [A] long (same device as hidden); a pair with
        ``expert_index == N`` (num_experts) was dropped by the expert capacity: it goes to no expert
        and its token's combined output is zero (the pair sorts last and is cut off, no boolean mask);
        host_tokens_per_expert: optional [N] CPU long, the kept pairs per expert;
        one_pair_per_token: the caller guarantees token_index == arange(T) (A == T);
        row_order: optional [T] permutation (a local token shuffle): the pairs of one expert are
        taken in this order instead of token order (as if the rows had been permuted by it).
        """
        if row_order is not None:
            order = row_order.index_select(0, torch.argsort(expert_index.index_select(0, row_order), stable=True))
        else:
            order = torch.argsort(expert_index, stable=True)
        if host_tokens_per_expert is not None:
            counts = host_tokens_per_expert.to(torch.long)
        else:  # the one sync; bin N counts the dropped pairs
            counts = _to_host(tokens_per_expert(expert_index, self.num_experts + 1)[: self.num_experts])
        kept = int(counts.sum())
        inverse, sorted_token_index = None, None
        if one_pair_per_token:
            inverse = _inverse_permutation(order)
            permuted = _DispatchRows.apply(hidden, order, inverse, kept)
        else:
            sorted_token_index = token_index.index_select(0, order[:kept])
            permuted = hidden.index_select(0, sorted_token_index)
        state = DispatchState(sorted_token_index, order, hidden.shape[0], counts, inverse=inverse, kept=kept)
        if self.ep_size == 1:
            return permuted, state
        return self._exchange(permuted, counts, state, host_counts=host_tokens_per_expert is not None)

    def _exchange(self, permuted, counts, state, host_counts: bool):
        from megatron.core.tensor_parallel import all_to_all

        all_counts = self._all_gather_counts(counts, host_counts)  # [ep, N] CPU
        local = self.num_local_experts
        state.input_splits = counts.view(self.ep_size, local).sum(1).tolist()
        mine = slice(self.ep_rank * local, (self.ep_rank + 1) * local)
        recv_counts = all_counts[:, mine]  # [ep (source), L]
        state.output_splits = recv_counts.sum(1).tolist()
        state.tokens_per_local_expert = recv_counts.sum(0)
        regroup, ungroup = _regroup_indices(recv_counts.numpy())
        state.regroup = regroup.to(permuted.device, non_blocking=True)
        state.ungroup = ungroup.to(permuted.device, non_blocking=True)
        received = all_to_all(self.ep_group, permuted, state.output_splits, state.input_splits)
        return received.index_select(0, state.regroup), state

    def _all_gather_counts(self, counts: torch.Tensor, host_counts: bool) -> torch.Tensor:
        """[ep, N] per-rank counts on the host; over the gloo group when the counts are on the host."""
        group = self.host_ep_group if host_counts and self.host_ep_group is not None else self.ep_group
        device = torch.device("cpu") if group is self.host_ep_group or not torch.cuda.is_available() \
            else torch.device("cuda", torch.cuda.current_device())
        local = counts.to(device)
        gathered = [torch.empty_like(local) for _ in range(self.ep_size)]
        torch.distributed.all_gather(gathered, local, group=group)
        stacked = torch.stack(gathered)
        return stacked if stacked.device.type == "cpu" else _to_host(stacked)

    # ------------------------------------------------------------------------------------------
    def combine(self, expert_output: torch.Tensor, state: DispatchState, gates: torch.Tensor) -> torch.Tensor:
        """Undo ``dispatch`` and return [T, h] = sum over each token's pairs of gate * expert output."""
        if self.ep_size > 1:
            from megatron.core.tensor_parallel import all_to_all

            source_major = expert_output.index_select(0, state.ungroup)
            expert_output = all_to_all(self.ep_group, source_major, state.input_splits, state.output_splits)
        if state.inverse is not None:  # one pair per token: un-permute and weight in one function
            return _GatedCombine.apply(expert_output, gates, state.order, state.inverse)
        pair_gates = gates.index_select(0, state.order[: state.kept])
        weighted = expert_output * pair_gates.to(expert_output.dtype).unsqueeze(-1)
        out = expert_output.new_zeros(state.num_tokens, expert_output.shape[-1])
        return out.index_add(0, state.sorted_token_index, weighted)
