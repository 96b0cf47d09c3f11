"""Megatron adapters around the pure routing functions of :mod:`stablemoe_megatron.routing`.

A router module holds the routing parameters (centroids ``E`` / a gate projection ``W``, the
distilled token-id router ``D, E^``), calls its algorithm's pure functions (the
:class:`~stablemoe_megatron.routing.RoutingAlgorithm` registered under ``--moe-router``), and does
the communication those must not do: under sequence parallelism a data-parallel rank's micro-batch
is split over the tensor-parallel ranks, so counts are summed over the TP group (and BASE / Expert
Choice solve on the gathered scores). ``forward`` returns a :class:`RoutingDecision` of
(token, expert, gate) pairs.

One generic module runs every learned top-1 algorithm (:class:`TokenChoiceRouter`); two hold state
of their own: :class:`HashRouter` (the token-id table) and :class:`ExpertChoiceRouter` (the
evaluation thresholds). The algorithm's ``adapter`` names which (:func:`router_class`).

Counting set (``--moe-balance-count-scope``): |A_i|, n_bar = T/N and the T that normalises the
per-token losses are counted over the micro-batch of one data-parallel rank by default
(``micro-batch``): all tokens of that micro-batch, summed over its TP/SP shards, but not over other
data-parallel or expert-parallel ranks (each computes its own); no communication beyond the TP
group. ``data-parallel`` (the authors' code, training only) counts over the micro-batches of every
data-parallel rank of this forward: one all-reduce of the [N] counts and T over the data-parallel
group (``pg_collection.dp_cp``), divided by its size W, so that n_i / n_bar is the global ratio and a
loss divided by this T is W times the rank's share of the global per-token loss: the ranks' mean
(megatron averages gradients over DP) is the loss over all their tokens. The expert capacity is
then counted over all their tokens too (the routing decisions are all-gathered, not the tokens).

Distil-and-freeze composes with the distillable top-1 routers (stablemoe, switch, base): in stage 1
the distilled router learns to predict the router's top-1 choice (cross-entropy against the
detached choice); :meth:`TokenChoiceRouter.freeze_distilled` ends stage 1: from then on the
distilled router decides the expert from the token ids alone, its parameters are frozen (no grad,
excluded from the optimizer by the trainer), and the gate still comes from the backbone score.

Top-k (``--moe-router-topk`` k > 1; docs/ALGORITHMS.md §8): ``[T, k]`` choices become T*k pairs,
the capacity counts pairs; stage 2 routes with the distilled router's k best (a ``[V, k]`` table).
"""
from __future__ import annotations

from typing import Optional

import torch

from stablemoe_megatron import routing
from stablemoe_megatron.moe.config import MoEConfig
from stablemoe_megatron.moe.dispatcher import _inverse_permutation
from stablemoe_megatron.moe.router_base import RouterBase, RouterInputs, RoutingDecision, _mean_gate
from stablemoe_megatron.routing.capacity import capacity_keep_mask, expert_capacity_per_expert
from stablemoe_megatron.routing.common import choice_pairs


class TokenChoiceRouter(RouterBase):
    """Learned top-1 routing (every ``top1`` algorithm; top-k with ``--moe-router-topk``) with
    optional distil-and-freeze and capacity dropping.

    The algorithm supplies the backbone scores ``[T, N]`` (``scores``), the stage-1 routing and
    its unweighted losses (``train_routing``) and the gate of given experts (``chosen_gate``);
    this module weights the losses, adds the distillation loss and drops over capacity. A choice
    is ``[T]`` experts (k = 1) or ``[T, k]`` (k > 1) throughout; the decision holds their pairs.
    """

    def __init__(self, config, moe: MoEConfig, vocab_size: int, pg_collection):
        super().__init__(config, moe, vocab_size, pg_collection)
        self.weight = self._new_weight(self.num_experts, config.hidden_size)
        kind = moe.effective_distill_router
        self.distilled = None
        if kind is not None:
            from stablemoe_megatron.routing.distilled import build_distilled_router

            options = {"num_layers": moe.distill_layers} if kind != "wordemb" else {}
            options.update(embedding_init=moe.distill_embedding_init, centroid_init=moe.centroid_init,
                           centroid_gain=moe.centroid_init_gain)
            self.distilled = build_distilled_router(kind, vocab_size, self.num_experts, moe.distill_dim, **options)
            self._mark_replicated(self.distilled)
        self.frozen = False
        self._host_table: Optional[torch.Tensor] = None
        self.register_buffer("expert_table", None, persistent=False)

    # -- the algorithm -------------------------------------------------------------------------
    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Backbone routing scores [T, N] of hidden [T, d]."""
        return self.algorithm.scores(hidden, self.weight)

    def assign(self, scores: torch.Tensor):
        """Stage-1 routing: (expert_ids [T], gates [T], aux_loss scalar, metrics); [T, k] experts
        and gates for top-k.

        aux_loss is the coefficient-weighted sum of the algorithm's losses (detached outside
        training); each weighted term is also a metric under its name.
        """
        expert_ids, gates, losses = self.algorithm.train_routing(scores, self)
        aux_loss, metrics = None, {}
        for name, loss in losses.items():
            weighted = self.loss_coeff(name) * loss
            metrics[name] = weighted.detach()
            aux_loss = weighted if aux_loss is None else aux_loss + weighted
        if aux_loss is None:
            return expert_ids, gates, scores.new_zeros(()), metrics
        return expert_ids, gates, (aux_loss if self.training else aux_loss.detach()), metrics

    def chosen_gate(self, hidden: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Gates [T] of given experts [T] (stage 2), without the [T, N] scores where the gate
        allows; [T, k] of given top-k experts [T, k], as top-k routing gates them."""
        if expert_ids.dim() == 2:
            return self.algorithm.chosen_gate(hidden, self.weight, expert_ids, pre_softmax=self.pre_softmax)
        return self.algorithm.chosen_gate(hidden, self.weight, expert_ids)

    # -- distilled router ----------------------------------------------------------------------
    @property
    def takes_shuffle_order(self) -> bool:
        """Top-1 routing (one pair per token): the scores are permuted, not the rows."""
        return self.topk == 1 and self.algorithm.one_pair_per_token

    @property
    def stage(self) -> int:
        return 2 if self.frozen else 1

    def freeze_distilled(self) -> None:
        """End stage 1: the distilled router routes from now on; its parameters never change again."""
        if self.distilled is None:
            raise RuntimeError("freeze_distilled: this router has no distilled router")
        self.frozen = True
        for param in self.distilled.parameters():
            param.requires_grad_(False)
            param.grad = None
        if self.distilled.context_free:  # [V], or [V, k] for top-k
            with torch.no_grad():
                self.expert_table = self.distilled.expert_table(topk=self.topk)
            self._host_table = self.expert_table.cpu()

    def distilled_scores(self, inputs: RouterInputs) -> torch.Tensor:
        """[T, N] distilled scores of the local tokens (context routers see whole sequences)."""
        if self.distilled.context_free:
            return self.distilled.scores(inputs.token_ids.unsqueeze(0)).squeeze(0)
        full = self.distilled.scores(inputs.full_token_ids)  # [B, S, N]
        local = full.transpose(0, 1)[inputs.local_positions]  # [S_local, B, N], sequence-major
        return local.reshape(-1, self.num_experts)

    def distilled_choice(self, inputs: RouterInputs):
        """Stage-2 experts [T] ([T, k] for top-k: the distilled router's k best) and, when
        computable without a device sync, the host counts [N] of their pairs."""
        if self.expert_table is None:
            with torch.no_grad():
                return routing.distilled_assignment(self.distilled_scores(inputs), topk=self.topk), None
        expert_ids = self.expert_table[inputs.token_ids]
        host_counts = None
        if inputs.host_token_ids is not None:
            host_ids = self._host_table[inputs.host_token_ids].reshape(-1)
            host_counts = torch.bincount(host_ids, minlength=self.num_experts)
        return expert_ids, host_counts

    def distilled_expert_ids(self, inputs: RouterInputs):
        """The distilled router's first choice [T] (its argmax; the routing probe's view) and host
        counts [N] when :meth:`distilled_choice` has them for it (top-1 only)."""
        expert_ids, host_counts = self.distilled_choice(inputs)
        return (expert_ids, host_counts) if expert_ids.dim() == 1 else (expert_ids[:, 0], None)

    def backbone_expert_ids(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone's greedy choice (the routing probe records it next to the distilled one)."""
        return routing.greedy_assignment(self.scores(hidden))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, inputs: RouterInputs) -> RoutingDecision:
        host_counts, teacher = None, None
        if self.frozen or (not self.training and self.moe.routes_distilled_in_evaluation):
            expert_ids, host_counts = self.distilled_choice(inputs)
            gates = self.chosen_gate(inputs.hidden, expert_ids)
            aux_loss, metrics = gates.new_zeros((), dtype=torch.float32), {}
        else:
            scores = self.scores(inputs.hidden)
            if inputs.row_order is not None:  # decide on the scores in the shuffle's order
                scores = scores.index_select(0, inputs.row_order)
            expert_ids, gates, aux_loss, metrics = self.assign(scores)
            teacher = self.distillation_teacher(scores, expert_ids)
            if inputs.row_order is not None:  # ... and give the decision back in token order
                expert_ids, gates, teacher = _in_token_order(inputs.row_order, expert_ids, gates, teacher)
            if self.distilled is not None:
                aux_loss = aux_loss + self._distill(inputs, teacher, metrics)
        one_pair_per_token = self.algorithm.one_pair_per_token and expert_ids.dim() == 1
        token_index, expert_ids, gates = choice_pairs(expert_ids, gates)
        expert_ids, host_counts = self._apply_capacity(expert_ids, gates, host_counts, inputs.row_order, metrics)
        return RoutingDecision(token_index, expert_ids, gates, aux_loss, host_counts, metrics, teacher,
                               one_pair_per_token)

    def distillation_teacher(self, scores: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Stage-1 distillation target [T] (``--moe-distill-teacher``), from scores [T, N] and the
        assigned experts [T] ([T, k] both for top-k).

        ``assignment``: the assigned experts (paper §3.1: where the token is actually sent).
        ``greedy``: argmax of the backbone scores (the authors' code; the k largest for top-k),
        which differs from the assignment only for BASE's balanced assignment (greedy routers
        assign the argmax).
        """
        if self.moe.distill_teacher == "greedy" and self.distilled is not None:
            if expert_ids.dim() == 2:
                return torch.topk(scores.detach(), expert_ids.shape[1], dim=-1).indices
            return routing.greedy_assignment(scores.detach())
        return expert_ids

    def _distill(self, inputs: RouterInputs, teacher_ids: torch.Tensor, metrics) -> torch.Tensor:
        student = self.distilled_scores(inputs)
        num_tokens = self._counting_size(teacher_ids.shape[0])
        loss = routing.distillation_loss(student, teacher_ids.detach(), num_tokens)
        weighted = self.moe.distill_loss_coeff * loss
        metrics["distill_loss"] = weighted.detach()
        metrics["distill_agreement"] = routing.distillation_agreement(student, teacher_ids)
        return weighted if self.training else weighted.detach()

    def _apply_capacity(self, expert_ids, gates, host_counts, row_order, metrics):
        """In training with an expert capacity (c < N; c >= N can drop nothing): mark the pairs over
        capacity with expert id N (no boolean mask, so no device sync) and log ``dropped_fraction``
        and ``mean_gate`` (of the kept pairs). Returns (expert ids [A], host counts [N] of the kept
        pairs or None). Where the host counts show that no expert overflows, no ranking is done."""
        capacity = self.moe.effective_capacity_factor
        if not self.training or capacity is None or capacity >= self.num_experts:
            metrics["mean_gate"] = _mean_gate(gates)
            return expert_ids, host_counts
        kept_counts = self._kept_host_counts(host_counts, expert_ids.shape[0])
        if kept_counts is not None and torch.equal(kept_counts, host_counts):
            metrics["dropped_fraction"] = gates.new_zeros((), dtype=torch.float32)
            metrics["mean_gate"] = _mean_gate(gates)
            return expert_ids, host_counts
        keep = self._capacity_keep_in_order(expert_ids, gates, row_order)
        metrics["dropped_fraction"] = 1.0 - keep.float().mean()
        metrics["mean_gate"] = _mean_gate(gates, keep)
        return torch.where(keep, expert_ids, self.num_experts), kept_counts

    def _kept_host_counts(self, host_counts: Optional[torch.Tensor], num_pairs: int) -> Optional[torch.Tensor]:
        """Host counts [N] of the pairs kept by the capacity, from the host counts [N] of all pairs:
        ``min(n_i, capacity)`` when the counting set is these local pairs (no SP shards, no DP
        counting); otherwise None (which pairs stay depends on gates elsewhere: device counts)."""
        if host_counts is None or self._sequence_split() or self._over_data_parallel():
            return None
        capacity = expert_capacity_per_expert(num_pairs, self.num_experts, self.moe.effective_capacity_factor)
        return host_counts.clamp(max=capacity)

    def _capacity_keep(self, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Keep mask [A_local] of the pairs (expert_ids, gates [A_local], A = T*k); capacity
        ceil(A*c/N) (Megatron's ceil(T*k/N*c)) and ranking by gate over the counting set: the DP
        rank's whole micro-batch (all SP shards), or every DP rank's
        (``--moe-balance-count-scope data-parallel``)."""
        full_ids = self._gather_counting_set(expert_ids)
        full_gates = self._gather_counting_set(gates.detach())
        capacity = expert_capacity_per_expert(full_ids.shape[0], self.num_experts,
                                              self.moe.effective_capacity_factor)
        keep = capacity_keep_mask(full_ids, full_gates, self.num_experts, capacity)
        return keep[self._counting_set_rows(expert_ids.shape[0])]

    def _capacity_keep_in_order(self, expert_ids, gates, row_order: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`_capacity_keep` of the pairs taken in ``row_order`` [T] (the token shuffle's
        order: ties go to the earlier token in it), as a keep mask [T] in the given order."""
        if row_order is None:
            return self._capacity_keep(expert_ids, gates)
        keep = self._capacity_keep(expert_ids.index_select(0, row_order), gates.index_select(0, row_order))
        return torch.empty_like(keep).scatter_(0, row_order, keep)


def _in_token_order(row_order: torch.Tensor, *tensors: torch.Tensor):
    """Tensors [T, ...] indexed by position in ``row_order`` [T], re-indexed by token row
    (``out[row_order[i]] = t[i]``; differentiable)."""
    inverse = _inverse_permutation(row_order)
    return tuple(t.index_select(0, inverse) for t in tensors)


class HashRouter(RouterBase):
    """Hash layer: a fixed token-id -> expert table, gate 1, no routing parameters.

    The table is a persistent buffer (checkpointed): the seeded random table, or the
    frequency-balanced one that the trainer builds from the training data's token counts and
    installs with :meth:`set_table` before training.
    """

    def __init__(self, config, moe: MoEConfig, vocab_size: int, pg_collection):
        super().__init__(config, moe, vocab_size, pg_collection)
        table = routing.random_hash_table(vocab_size, self.num_experts, moe.hash_seed)
        self.register_buffer("table", table)
        self._host_table = table.clone()

    @property
    def takes_shuffle_order(self) -> bool:
        return True

    def set_table(self, table: torch.Tensor) -> None:
        if table.shape != self.table.shape:
            raise ValueError(f"hash table must have shape {tuple(self.table.shape)}, got {tuple(table.shape)}")
        self.table.copy_(table)
        self._host_table = table.cpu().clone()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_table = self.table.cpu().clone()

    def forward(self, inputs: RouterInputs) -> RoutingDecision:
        expert_ids = self.algorithm.train_routing(inputs.token_ids, self.table)
        host_counts = None
        if inputs.host_token_ids is not None:
            host_counts = torch.bincount(self._host_table[inputs.host_token_ids], minlength=self.num_experts)
        gates = torch.ones(expert_ids.shape[0], device=expert_ids.device)
        token_index = torch.arange(expert_ids.shape[0], device=expert_ids.device)
        zero = inputs.hidden.new_zeros((), dtype=torch.float32)
        return RoutingDecision(token_index, expert_ids, gates, zero, host_counts, {"mean_gate": _mean_gate(gates)},
                               one_pair_per_token=self.algorithm.one_pair_per_token)


class ExpertChoiceRouter(RouterBase):
    """Expert Choice (Zhou et al. 2022): each expert takes its top-k tokens, k = T*c/N, gate S[t,i].

    Training looks at the whole micro-batch (a token's routing depends on later tokens: a
    look-ahead in a causal LM). Evaluation uses causal threshold routing: token t goes to every
    expert whose probability for t reaches that expert's threshold, an exponential moving average
    (``expert_choice_threshold_momentum``) of the k-th largest probability seen in training.
    The per-step k-th values are averaged over the data-parallel group by
    :meth:`finalize_step` (called by the trainer after each optimizer step), so the thresholds
    (a persistent, checkpointed buffer) are identical on every rank.
    """

    def __init__(self, config, moe: MoEConfig, vocab_size: int, pg_collection):
        super().__init__(config, moe, vocab_size, pg_collection)
        self.weight = self._new_weight(self.num_experts, config.hidden_size)
        self.capacity_factor = moe.effective_capacity_factor
        self.register_buffer("thresholds", torch.zeros(self.num_experts))
        self.register_buffer("thresholds_initialized", torch.zeros((), dtype=torch.bool))
        self._kth_sum = None
        self._kth_count = 0

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [T, N] of hidden [T, d]."""
        return self.algorithm.scores(hidden, self.weight)

    @property
    def takes_shuffle_order(self) -> bool:
        return True

    def forward(self, inputs: RouterInputs) -> RoutingDecision:
        logits = self.scores(inputs.hidden)
        probs = routing.router_probs(logits)
        num_local = probs.shape[0]
        aux, metrics = logits.new_zeros(()), {}
        if self.training:
            ordered = probs if inputs.row_order is None else probs.index_select(0, inputs.row_order)
            full = self._gather_over_sequence(ordered.detach())
            k = routing.expert_capacity(full.shape[0], self.num_experts, self.capacity_factor)
            token_index, expert_index, _ = self.algorithm.train_routing(full, k)
            if self._sequence_split():  # keep this rank's rows (a boolean mask: a device sync)
                rows = self._local_rows(num_local)
                local = (token_index >= rows.start) & (token_index < rows.stop)
                token_index, expert_index = token_index[local] - rows.start, expert_index[local]
            if inputs.row_order is not None:  # positions in the shuffle's order -> token rows
                token_index = inputs.row_order.index_select(0, token_index)
            if not inputs.replay:  # a recomputed call must not count twice
                self._accumulate_kth(routing.kth_largest_probs(full, k))
            if self.loss_coeff("z_loss"):
                aux = self.loss_coeff("z_loss") * routing.z_loss(logits, self._counting_size(num_local))
                metrics["z_loss"] = aux.detach()
        else:
            token_index, expert_index, _ = routing.threshold_assignment(probs, self.thresholds)
        gates = probs[token_index, expert_index]
        routed = torch.zeros(num_local, dtype=torch.bool, device=probs.device)
        routed[token_index] = True
        metrics["dropped_fraction"] = 1.0 - routed.float().mean()
        metrics["mean_gate"] = _mean_gate(gates)
        return RoutingDecision(token_index, expert_index, gates, aux, None, metrics,
                               one_pair_per_token=self.algorithm.one_pair_per_token)

    def _accumulate_kth(self, kth: torch.Tensor) -> None:
        self._kth_sum = kth if self._kth_sum is None else self._kth_sum + kth
        self._kth_count += 1

    @torch.no_grad()
    def finalize_step(self, dp_group=None) -> None:
        """Fold this step's k-th largest probabilities (averaged over DP) into the thresholds."""
        if self._kth_sum is None:
            return
        mean_kth = self._kth_sum / self._kth_count
        if dp_group is not None and dp_group.size() > 1:
            torch.distributed.all_reduce(mean_kth, group=dp_group)
            mean_kth /= dp_group.size()
        momentum = self.moe.expert_choice_threshold_momentum
        if bool(self.thresholds_initialized):
            self.thresholds.mul_(momentum).add_(mean_kth.to(self.thresholds.dtype), alpha=1 - momentum)
        else:
            self.thresholds.copy_(mean_kth)
            self.thresholds_initialized.fill_(True)
        self._kth_sum, self._kth_count = None, 0


# The router module of each adapter kind (RoutingAlgorithm.adapter); keyed by kind, not by router
# name: which routers exist is the registry's business.
ADAPTER_CLASSES = {
    "top1": TokenChoiceRouter,
    "hash-table": HashRouter,
    "expert-choice": ExpertChoiceRouter,
}


def router_class(name: str):
    """The router module class for ``--moe-router name``: the one of its algorithm's adapter kind.

    ``KeyError`` listing the choices for an unknown name.
    """
    return ADAPTER_CLASSES[routing.get_routing(name).adapter]
