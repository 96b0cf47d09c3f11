"""What every router module shares: the decision it returns, the inputs it sees, and the base
class with the tensor-parallel counting of :mod:`stablemoe_megatron.moe.routers` (see there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from megatron.core.transformer.module import MegatronModule

from stablemoe_megatron import routing
from stablemoe_megatron.moe.config import MoEConfig


@dataclass
class RoutingDecision:
    """Routing of the T local tokens of one MoE layer call.

    token_index, expert_index, gates: [A] pairs (A = T for top-1, T*k for top-k); in training with
        an expert capacity, a pair over capacity has ``expert_index == N`` (dropped: it goes to no
        expert, its token keeps its residual); it stays in the pairs so that no boolean mask (a
        device sync) is needed; ``host_tokens_per_expert`` then counts the kept pairs.
    aux_loss: scalar, coefficient-weighted sum of the losses this router adds to the total loss.
    host_tokens_per_expert: [N] CPU counts when known without a device sync, else None.
    metrics: detached scalars for logging (loss values, agreement, mean gate ...).
    top1_expert_ids: [T] the router's own top-1 choice ([T, k] its top-k choice with
        ``--moe-router-topk`` k > 1): the stage-1 distillation teacher, see
        ``TokenChoiceRouter.distillation_teacher``; or None.
    one_pair_per_token: token_index is ``arange(T)`` (top-1 routing, dropped pairs included): the
        dispatcher's sort by expert is then a permutation of the tokens (a faster path). False
        for top-k routing (A = T*k pairs, k per token).
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor
    aux_loss: torch.Tensor
    host_tokens_per_expert: Optional[torch.Tensor] = None
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    top1_expert_ids: Optional[torch.Tensor] = None
    one_pair_per_token: bool = False


@dataclass
class RouterInputs:
    """What a router sees for one call (shapes for T local tokens, sequence-major as the hidden).

    hidden: [T, d]; token_ids: [T] device; host_token_ids: [T] CPU or None;
    full_token_ids: [B, S] device (the whole sequences, for context-dependent distilled routers),
        None after ``--moe-token-shuffle`` (the rows are no longer this rank's sequences);
    local_positions: slice of the sequence dimension held by this rank (sequence parallelism).
    replay: this call re-runs a training forward already made (activation recomputation): the
        router must decide the same and update no state of its own (statistics, thresholds).
    """

    hidden: torch.Tensor
    token_ids: torch.Tensor
    full_token_ids: Optional[torch.Tensor]
    local_positions: slice
    host_token_ids: Optional[torch.Tensor] = None
    replay: bool = False
    row_order: Optional[torch.Tensor] = None  # [T] the token shuffle's order, when not applied to the rows


class RouterBase(MegatronModule):
    """Shared plumbing: TP-group counting, parameters replicated over TP with SP-reduced grads.

    Also the :class:`~stablemoe_megatron.routing.registry.RoutingContext` its algorithm's
    ``train_routing`` is given (:meth:`count`, :meth:`over_micro_batch`, :meth:`loss_coeff`).
    """

    def __init__(self, config, moe: MoEConfig, vocab_size: int, pg_collection):
        super().__init__(config=config)
        self.algorithm = routing.get_routing(moe.router)
        self.moe = moe
        self.num_experts = moe.num_experts
        self.topk = moe.effective_router_topk  # RoutingContext.topk / pre_softmax
        self.pre_softmax = moe.effective_router_pre_softmax
        self.vocab_size = vocab_size
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size() if self.tp_group is not None else 1
        self.dp_group = getattr(pg_collection, "dp_cp", None)
        if moe.balance_count_scope == "data-parallel" and self.dp_group is None:
            raise ValueError("--moe-balance-count-scope data-parallel needs the data-parallel group: "
                             "pass a pg_collection with dp_cp")
        self.layer_number = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    @property
    def takes_shuffle_order(self) -> bool:
        """Whether a local token shuffle (one data-parallel rank) may hand this router its order
        (:attr:`RouterInputs.row_order`) instead of moving the rows: the router then decides on its
        [T, N] scores (or the token ids) taken in that order and returns the decision in token
        order, which is the decision on moved rows, without a [T, d] copy."""
        return False

    def _mark_replicated(self, module_or_param) -> None:
        """Replicated over TP but fed different tokens under SP: megatron all-reduces the grads."""
        params = [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) \
            else list(module_or_param.parameters())
        for param in params:
            param.sequence_parallel = self.config.sequence_parallel

    def _sequence_split(self) -> bool:
        return self.config.sequence_parallel and self.tp_size > 1

    def _counting_size(self, num_local_tokens: int) -> int:
        """T of the counting set: the DP rank's micro-batch, all of its SP shards."""
        return num_local_tokens * (self.tp_size if self._sequence_split() else 1)

    def _over_data_parallel(self) -> bool:
        """Count over every DP rank: ``--moe-balance-count-scope data-parallel``, training, DP > 1."""
        return (self.training and self.moe.balance_count_scope == "data-parallel"
                and self.dp_group is not None and self.dp_group.size() > 1)

    def count(self, expert_ids: torch.Tensor):
        """(tokens_per_expert [N], T) of expert_ids [T_local] over the counting set.

        ``micro-batch``: the DP rank's micro-batch (summed over TP under SP), counts long, T int.
        ``data-parallel``: summed over the DP ranks too and divided by their number W (float64
        tensors): the mean micro-batch's counts, the global ratios n_i / n_bar (module docstring).
        """
        counts = routing.tokens_per_expert(expert_ids, self.num_experts)
        if self._sequence_split():
            counts = counts.clone()
            torch.distributed.all_reduce(counts, group=self.tp_group)
        num_tokens = self._counting_size(expert_ids.shape[0])
        if not self._over_data_parallel():
            return counts, num_tokens
        totals = torch.cat([counts, counts.new_full((1,), num_tokens)])
        torch.distributed.all_reduce(totals, group=self.dp_group)
        totals = totals.double() / self.dp_group.size()
        return totals[:-1], totals[-1]

    def _gather_over_sequence(self, tensor: torch.Tensor) -> torch.Tensor:
        """All TP shards of a [T_local, ...] tensor, in sequence order (no autograd)."""
        if not self._sequence_split():
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.tp_group)
        return torch.cat(parts)

    def _local_rows(self, num_local: int) -> slice:
        rank = self.tp_group.rank() if self._sequence_split() else 0
        return slice(rank * num_local, (rank + 1) * num_local)

    def _gather_counting_set(self, tensor: torch.Tensor) -> torch.Tensor:
        """The counting set's rows of a [T_local, ...] tensor (no autograd): the micro-batch (all SP
        shards) and, counting over every DP rank, all their micro-batches in DP rank order (equal
        micro-batches). :meth:`_counting_set_rows` are this rank's rows of it."""
        full = self._gather_over_sequence(tensor)
        if not self._over_data_parallel():
            return full
        parts = [torch.empty_like(full) for _ in range(self.dp_group.size())]
        torch.distributed.all_gather(parts, full.contiguous(), group=self.dp_group)
        return torch.cat(parts)

    def _counting_set_rows(self, num_local: int) -> slice:
        rows = self._local_rows(num_local)
        if not self._over_data_parallel():
            return rows
        offset = self.dp_group.rank() * self._counting_size(num_local)
        return slice(offset + rows.start, offset + rows.stop)

    def over_micro_batch(self, fn, local: torch.Tensor):
        """``fn`` of the whole micro-batch's rows of ``local`` [T_local, ...] (gathered over the SP
        shards, no autograd), this rank's T_local rows of the result."""
        return fn(self._gather_over_sequence(local))[self._local_rows(local.shape[0])]

    def loss_coeff(self, loss: str) -> float:
        """Weight of the loss term ``loss``: the MoEConfig field ``<loss>_coeff``."""
        return getattr(self.moe, f"{loss}_coeff")

    def _new_weight(self, rows: int, cols: int) -> torch.nn.Parameter:
        """The router weight [N, d]: centroids E (stablemoe, base) or projection W (switch,
        expert-choice), the same role (scores = hidden @ weight^T), so ``--moe-centroid-init``
        covers both.

        Every rank holds all N rows, drawn from the run's main RNG stream, which is the same on
        every rank and not touched by the expert construction: the weight does not depend on the
        expert-parallel size. ``normal``: megatron's init_method, N(0, --init-method-std).
        ``orthogonal``: ``orthogonal_(gain)`` (the authors' code), rows orthonormal times the gain
        when N <= d; it draws the same N*d normals before its QR, so every later weight is
        initialised as with ``normal``.
        """
        weight = torch.empty(rows, cols, dtype=torch.float32)
        if self.moe.centroid_init == "orthogonal":
            torch.nn.init.orthogonal_(weight, gain=self.moe.centroid_init_gain)
        else:
            self.config.init_method(weight)
        param = torch.nn.Parameter(weight)
        self._mark_replicated(param)
        return param


def _mean_gate(gates: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean gate [] of the pairs (of the kept ones where ``keep`` [A] is given); 0 for none."""
    if keep is None:
        return gates.detach().float().mean() if gates.numel() else gates.new_zeros(())
    kept = keep.float()
    return (gates.detach().float() * kept).sum() / kept.sum().clamp_min(1.0)
