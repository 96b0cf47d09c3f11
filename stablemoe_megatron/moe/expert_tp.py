"""Expert tensor parallelism (``--expert-tensor-parallel-size``, ETP > 1): each expert's FFN split over
megatron's expert-tensor-parallel group, as Megatron-LM does it.

The ranks of one expert-TP group hold the same local experts, each as megatron's expert MLP built on
that group: fc1 column-parallel (rank r holds rows ``r*F/t .. (r+1)*F/t`` of ``[F, h]``; with a gated
unit the same rows of both halves), fc2 row-parallel (columns of ``[h, F]``). Expert linear layers
communicate nothing themselves (megatron's ``explicit_expert_comm``): fc2 returns this rank's partial
sum of the FFN output. The ranks hold DIFFERENT tokens (sequence shards under TP + sequence
parallelism, other batches under data parallelism), each routed by its own rank; the dispatcher
hands each rank the rows ``[R_r, h]`` its local experts received, grouped by local expert. Around the
experts (:class:`ExpertTensorParallel`), as megatron's ``MoEAlltoAllTokenDispatcher`` does:

1. the per-local-expert counts ``[L]`` of the group's ranks are all-gathered (host integers ``[t, L]``);
2. the rows are all-gathered, each rank's padded to the group's largest count M (gloo's all-gather
   takes equal sizes only; the padding travels, it is never computed), and the real rows picked in
   (local expert, source rank) order: every rank of the group then runs the same rows in the same
   order through its shard of every expert;
3. Megatron layout (one FFN per expert, no inner norm): the experts' partial outputs, put back in
   the padded (source rank) order, are reduce-scattered to the rows' ranks; the gather's backward is
   the reduce-scatter of the partial input gradients: the exchange of megatron's dispatcher.
   Paper layout (K pre-norm residual sublayers per expert, ``ExpertLayerNorms``): the next
   sublayer's LayerNorm needs the whole FFN output, so each FFN runs between megatron's
   ``copy_to`` / ``reduce_from_tensor_model_parallel_region`` (forward all-reduce of the output,
   backward all-reduce of the input gradient) and the norms and residuals run replicated on the
   group. The stack's change is then split to this rank's rows (``scatter_to_sequence_parallel_region``:
   its backward all-gathers the rows' gradients) and the gather's backward keeps this rank's rows
   (``tensor_parallel_output_grad=False``): every rank of the group computes the FULL gradient of the
   replicated norms, which are (like every expert parameter) reduced over expert-data-parallel only.

The values equal one process's (tests/test_expert_tensor_parallel.py, local expert backend on gloo).
On NCCL the counts are gathered on the device: one device-to-host copy per layer call. With
transformer-engine's grouped experts the same exchange applies (megatron's grouped linears also skip
communication for experts); that path is not tested here (no transformer-engine on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

# (expert module, rows [R, h], tokens_per_expert [L] CPU, probs [R]) -> output rows [R, h]
FFN = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def whole_ffn(expert: torch.nn.Module, rows, tokens_per_expert, probs) -> torch.Tensor:
    """One megatron expert module's output (no expert TP: its own output is the FFN's)."""
    out, _ = expert(rows, tokens_per_expert, probs)
    return out


@dataclass
class _GroupRows:
    """The group's rows: ``counts[r, e]`` from rank r for local expert e, each rank's padded to ``padded``.

    ``order[i]``: the padded-gather row of the i-th row in (local expert, source rank) order.
    """

    counts: torch.Tensor  # [t, L] CPU long
    padded: int  # M = max_r sum_e counts[r, e]
    order: torch.Tensor  # [sum counts] long

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self.counts.sum(0)


def _expert_major_order(counts: np.ndarray, padded: int) -> np.ndarray:
    """Rows of a padded source-major gather ([t * M], rank r's rows grouped by local expert from
    r * M) listed in (local expert, source rank) order."""
    ranks, local = counts.shape
    offsets = np.concatenate([np.zeros((ranks, 1), dtype=np.int64), np.cumsum(counts, axis=1)[:, :-1]], axis=1)
    pieces = [r * padded + offsets[r, e] + np.arange(counts[r, e]) for e in range(local) for r in range(ranks)]
    return np.concatenate(pieces or [np.zeros(0)]).astype(np.int64)


class ExpertTensorParallel:
    """The exchange of expert inputs and outputs over one expert-TP group (size t > 1); see module doc.

    Args:
        group: megatron's expert-tensor-parallel group (``pg_collection.expt_tp``).
        replicated: paper layout (norms and residuals between the FFNs run replicated on the group).
    """

    def __init__(self, group, replicated: bool):
        self.group = group
        self.size, self.rank = group.size(), group.rank()
        self.replicated = replicated

    def run(self, compute: Callable[[torch.Tensor, torch.Tensor, FFN], torch.Tensor], hidden: torch.Tensor,
            tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``compute(rows, tokens_per_expert, ffn)`` on the group's rows; returns this rank's rows.

        hidden: [R, h] this rank's rows grouped by local expert; tokens_per_expert: [L] CPU long.
        compute gets rows [sum_r R_r, h] grouped by local expert and returns the same shape.
        """
        rows_here = hidden.shape[0]
        where = self._rows(tokens_per_expert)
        order = where.order.to(hidden.device)
        padded = torch.cat([hidden, hidden.new_zeros(where.padded - rows_here, hidden.shape[1])])
        gathered = gather_from_sequence_parallel_region(padded, not self.replicated, self.group)  # [t*M, h]
        out = compute(gathered.index_select(0, order), where.tokens_per_expert,
                      self.replicated_ffn if self.replicated else whole_ffn)
        out = out.new_zeros(gathered.shape).index_copy(0, order, out)
        if self.replicated:
            mine = scatter_to_sequence_parallel_region(out, self.group)
        else:
            mine = reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mine[:rows_here]

    def replicated_ffn(self, expert, rows, tokens_per_expert, probs) -> torch.Tensor:
        """The FFN of replicated rows: the shards' partial outputs summed over the group."""
        rows = copy_to_tensor_model_parallel_region(rows, self.group)
        out, _ = expert(rows, tokens_per_expert, probs)
        return reduce_from_tensor_model_parallel_region(out, self.group)

    def _rows(self, tokens_per_expert: torch.Tensor) -> _GroupRows:
        """All-gather the group's per-local-expert counts (over the group's own backend)."""
        local = tokens_per_expert.to(torch.long)
        if torch.distributed.get_backend(self.group) != "gloo":  # NCCL: the counts travel on the device
            local = local.to(torch.device("cuda", torch.cuda.current_device()))
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        torch.distributed.all_gather(gathered, local, group=self.group)
        counts = torch.stack(gathered).cpu()
        padded = max(int(counts.sum(1).max()), 1)
        return _GroupRows(counts, padded, torch.from_numpy(_expert_major_order(counts.numpy(), padded)))
