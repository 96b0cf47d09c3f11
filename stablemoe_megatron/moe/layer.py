"""The MoE layer: our router and dispatcher around megatron-core's expert MLPs.

Used in both layouts (see :mod:`stablemoe_megatron.moe.specs`): as the MLP of a transformer layer
(Megatron layout, returns ``(g * FFN(x), None)`` for the layer's bias-dropout-add) or inside an
:class:`~stablemoe_megatron.moe.block.MoEBlock` (paper layout, K-deep expert stacks).

Token ids: megatron's transformer layers pass only hidden states to the MLP, so the model hands
the micro-batch's token ids ``[B, S]`` to every MoE layer before each forward, as one
:class:`MoEForwardContext` shared by the model's MoE layers (:meth:`StableMoELayer.set_forward_context`,
done by :class:`stablemoe_megatron.model.moe_host.MoEHost` on every pipeline stage). The layer takes
the rows matching its hidden states ``[S_local, B, h]`` (its sequence-parallel shard) itself.

Activation recomputation (``--recompute-granularity``): megatron's ``CheckpointFunction`` re-runs a
checkpointed forward during backward, possibly after the next micro-batch has handed its ids
(pipeline schedules). It restores the RNG states, not our per-call inputs, so the re-run
(:func:`recomputing`) reads what its original call used from that call's context: the token ids
and the ``--moe-token-shuffle`` key (:attr:`MoEForwardContext.shuffle_keys`). The model gives the
layers that context when the micro-batch's backward starts (``MoEHost``); a layer that recomputes
itself (``--recompute-modules moe``) passes it to its checkpointed function. A re-run routes as
the original call did (same hidden states, same ids) and skips the side effects of a call: the
routing metrics, the shuffle's call counter, the router's own statistics (``RouterInputs.replay``)
and ``last_decision``; the auxiliary loss is attached to the output only where gradients are
recorded, so once: in the re-run (the original checkpointed pass runs without grad).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.moe.moe_layer import BaseMoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

from stablemoe_megatron import routing
from stablemoe_megatron.moe.config import MoEConfig
from stablemoe_megatron.moe.dispatcher import AllToAllDispatcher
from stablemoe_megatron.moe.experts import ExpertStack
from stablemoe_megatron.moe.router_base import RouterInputs, RoutingDecision
from stablemoe_megatron.moe.shuffle import TokenShuffle

SCALAR_METRICS = ("balance_loss", "aux_loss", "z_loss", "distill_loss", "distill_agreement",
                  "dropped_fraction", "mean_gate")


@torch.no_grad()
def input_statistics(hidden: torch.Tensor, router_weight: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Scalars about what the router sees (logged per layer; no device sync).

    hidden: [S, B, d] (or [T, d]) the layer's input; router_weight: [N, d] centroids / projection, or None.
    ``input_rms``: sqrt(mean h^2); ``input_shared_fraction``: |mean_t h_t|^2 / mean_t |h_t|^2, the
    share of the hidden states' energy in the one vector all tokens share (0: no common offset,
    1: every token the same); ``centroid_norm``: mean row norm of the router weight. Together they
    show how routing scores s = h . E move: by the centroids, or by a common offset of every token.
    """
    rows = hidden.detach().float().reshape(-1, hidden.shape[-1])
    flat = rows.reshape(-1)
    energy = torch.dot(flat, flat) / max(rows.shape[0], 1)  # one pass, no [T, d] temporary
    out = {"input_rms": (energy / rows.shape[1]).sqrt(),
           "input_shared_fraction": rows.mean(dim=0).pow(2).sum() / energy.clamp_min(1e-30)}
    if router_weight is not None:
        out["centroid_norm"] = router_weight.detach().float().norm(dim=1).mean()
    return out


class MoELayerMetrics:
    """Per-step sums of one layer's routing statistics, kept on the device (no syncs).

    ``tokens_per_expert`` counts this rank's routed pairs; scalar metrics are averaged over the
    layer's calls (micro-batches) by :meth:`snapshot`. The trainer reduces them over ranks.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.sums: Dict[str, torch.Tensor] = {}
        self.calls = 0

    def add(self, decision: RoutingDecision) -> None:
        # no device sync; bin N counts the pairs dropped by the capacity
        counts = routing.tokens_per_expert(decision.expert_index, self.num_experts + 1)[: self.num_experts]
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        for name, value in decision.metrics.items():
            value = value.detach().float()
            self.sums[name] = value if name not in self.sums else self.sums[name] + value
        self.calls += 1

    def snapshot(self) -> Dict[str, torch.Tensor]:
        out = {name: value / max(self.calls, 1) for name, value in self.sums.items()}
        if self.tokens_per_expert is not None:
            out["tokens_per_expert"] = self.tokens_per_expert
        return out


@dataclass
class MoEForwardContext:
    """What the MoE layers of one model forward read besides their hidden states, and what a
    recomputation of their calls must repeat.

    token_ids: [B, S] device; host_token_ids: [B, S] CPU copy or None;
    shuffle_keys: {id(layer): the generator key of that layer's ``--moe-token-shuffle`` call}.
    """

    token_ids: torch.Tensor
    host_token_ids: Optional[torch.Tensor] = None
    shuffle_keys: Dict[int, int] = field(default_factory=dict)


def recomputing() -> bool:
    """Whether the running forward re-runs a checkpointed one during backward: megatron's
    ``CheckpointFunction`` flags both of its passes (``is_checkpointing``) and runs the first
    without grad, the recomputation with grad."""
    return torch.is_grad_enabled() and is_checkpointing()


def _default_pg_collection():
    """megatron's default MoE process groups, plus the data-parallel group (``dp_cp``)."""
    from megatron.core import parallel_state

    pg_collection = get_default_pg_collection()
    pg_collection.dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return pg_collection


class StableMoELayer(BaseMoELayer):
    """Route, dispatch, run expert stacks, combine. Returns the MoE output (no residual).

    Args (beyond megatron's): moe (MoEConfig), vocab_size (for token-id routers),
    num_sublayers (K), pre_norm (paper-layout sublayers with per-expert LayerNorm + residual),
    host_ep_group (gloo group over the EP ranks for host-side count exchange; optional).
    ``pg_collection.dp_cp`` (the data-parallel group: ranks holding different tokens here) serves
    ``--moe-token-shuffle`` and ``--moe-balance-count-scope data-parallel``.
    """

    def __init__(self, config, submodules: MoESubmodules, layer_number: Optional[int] = None,
                 pg_collection=None, *, moe: MoEConfig, vocab_size: int, num_sublayers: int = 1,
                 pre_norm: bool = False, host_ep_group=None):
        pg_collection = pg_collection if pg_collection is not None else _default_pg_collection()
        super().__init__(config=config, layer_number=layer_number, pg_collection=pg_collection)
        self.moe = moe
        self.router = submodules.router(config=config, pg_collection=pg_collection)
        self.experts = ExpertStack(config, submodules.experts, self.num_local_experts, num_sublayers,
                                   pre_norm, pg_collection)
        self.dispatcher = AllToAllDispatcher(moe.num_experts, self.ep_group, host_ep_group)
        self.metrics = MoELayerMetrics(moe.num_experts)
        self.tp_rank = self.attn_tp_group.rank() if self.attn_tp_group is not None else 0
        self._context: Optional[MoEForwardContext] = None
        self.replay_context: Optional[MoEForwardContext] = None  # set by the model when a backward starts
        self.recompute_self = (config.recompute_granularity == "selective"
                               and "moe" in (config.recompute_modules or ()))
        self.last_decision: Optional[RoutingDecision] = None
        self.keep_last_decision = False
        self.shuffle = self._token_shuffle(pg_collection) if moe.shuffles_tokens else None

    def _token_shuffle(self, pg_collection) -> TokenShuffle:
        """The ``--moe-token-shuffle`` exchange over the data-parallel group (checks its inputs)."""
        distilled = getattr(self.router, "distilled", None)
        if distilled is not None and not distilled.context_free:
            raise ValueError("--moe-token-shuffle needs a context-free distilled router (wordemb): a shuffled "
                             f"token is routed without its sequence, which {type(distilled).__name__} reads")
        group = getattr(pg_collection, "dp_cp", None)
        if group is None:
            raise ValueError("--moe-token-shuffle needs the data-parallel group: pass a pg_collection with dp_cp")
        return TokenShuffle(group, torch.initial_seed(), self.layer_number or 0, self.tp_rank)

    def set_token_ids(self, token_ids: torch.Tensor, host_token_ids: Optional[torch.Tensor] = None) -> None:
        """Token ids [B, S] of the next forward (device), and optionally their CPU copy."""
        self.set_forward_context(MoEForwardContext(token_ids, host_token_ids))

    def set_forward_context(self, context: MoEForwardContext) -> None:
        """The context (token ids) of the next forward, shared by the model's MoE layers."""
        self._context = context

    def router_inputs(self, hidden_states: torch.Tensor, context: Optional[MoEForwardContext] = None,
                      replay: bool = False) -> RouterInputs:
        """RouterInputs for hidden_states [S_local, B, h] from the ids of ``context`` (the ids set
        by the model for this forward by default)."""
        context = self._context if context is None else context
        if context is None:
            raise RuntimeError("StableMoELayer: token ids were not set; build the model with "
                               "stablemoe_megatron.model.StableMoEGPTModel, which hands them down")
        seq_local = hidden_states.shape[0]
        positions = slice(self.tp_rank * seq_local, (self.tp_rank + 1) * seq_local) \
            if self.config.sequence_parallel else slice(0, seq_local)
        local_ids = context.token_ids.t()[positions].reshape(-1)
        host_ids = None
        if context.host_token_ids is not None:
            host_ids = context.host_token_ids.t()[positions].reshape(-1)
        return RouterInputs(hidden_states.reshape(-1, hidden_states.shape[-1]), local_ids,
                            context.token_ids, positions, host_ids, replay)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None):
        """hidden_states [S_local, B, h] -> (MoE output [S_local, B, h], None).

        A recomputation (full, or ``--recompute-modules mlp``) re-runs the original call with its
        context; ``--recompute-modules moe`` checkpoints the layer here, as megatron's MoELayer does.
        """
        if self.training and recomputing():
            if self.replay_context is None:
                raise RuntimeError("StableMoELayer: a recomputed forward needs the token ids of its original "
                                   "call; build the model with stablemoe_megatron.model.moe_host.MoEHost "
                                   "(collect_moe_layers), which keeps them for the backward")
            return self._route_and_compute(hidden_states, self.replay_context, replay=True), None
        context = self._context
        if self.recompute_self and self.training and torch.is_grad_enabled():
            output = tensor_parallel.checkpoint(functools.partial(self._checkpointed, context), False, hidden_states)
        else:
            output = self._route_and_compute(hidden_states, context, replay=False)
        return output, None

    def _checkpointed(self, context: MoEForwardContext, hidden_states: torch.Tensor) -> torch.Tensor:
        """The checkpointed call of ``--recompute-modules moe``: its first pass runs without grad,
        its recomputation (in backward) with grad."""
        return self._route_and_compute(hidden_states, context, replay=torch.is_grad_enabled())

    def _route_and_compute(self, hidden_states: torch.Tensor, context: Optional[MoEForwardContext],
                           replay: bool) -> torch.Tensor:
        """hidden_states [S_local, B, h] -> MoE output [S_local, B, h]; ``replay``: a recomputation
        of the call that ``context`` recorded (same ids and shuffle; no side effects).

        With ``--moe-token-shuffle``, in training, routing and the experts run on the rows this
        rank receives from the shuffle (:mod:`.shuffle`), whose outputs are sent back after; with one
        data-parallel rank the rows stay and the router (deciding on its scores or ids in the
        shuffle's order) and the dispatcher take the order instead (same expert inputs, no copy).
        """
        inputs = self.router_inputs(hidden_states, context, replay)
        shuffled = None
        if self.shuffle is not None and self.training:
            key = self._shuffle_key(context, replay)
            if self.shuffle.world == 1 and self.router.takes_shuffle_order:  # the order only, rows stay
                drawn = self.shuffle.draw(inputs.hidden.shape[0], inputs.hidden.device, key)
                inputs.row_order, context.shuffle_keys[id(self)] = drawn.order, drawn.key
            else:
                rows, ids, shuffled = self.shuffle.shuffle(inputs.hidden, inputs.token_ids, key)
                context.shuffle_keys[id(self)] = shuffled.key
                host_ids = self.shuffle.shuffle_host_ids(inputs.host_token_ids, shuffled)
                inputs = RouterInputs(rows, ids, None, inputs.local_positions, host_ids, replay)
        decision = self.router(inputs)
        expert_input, state = self.dispatcher.dispatch(inputs.hidden, decision.token_index, decision.expert_index,
                                                       decision.host_tokens_per_expert, decision.one_pair_per_token,
                                                       inputs.row_order if decision.one_pair_per_token else None)
        expert_output = self.experts(expert_input, state.tokens_per_local_expert)
        output = self.dispatcher.combine(expert_output, state, decision.gates)
        if shuffled is not None:
            output = self.shuffle.unshuffle(output, shuffled)
        if self.training and decision.aux_loss.requires_grad:
            output = MoEAuxLossAutoScaler.apply(output, decision.aux_loss)
        if self.training and not replay:  # evaluation, probes and recomputations must not count
            decision.metrics.update(input_statistics(hidden_states, getattr(self.router, "weight", None)))
            self.metrics.add(decision)
        if self.keep_last_decision and not replay:
            self.last_decision = decision
        return output.view(hidden_states.shape)

    def _shuffle_key(self, context: MoEForwardContext, replay: bool) -> Optional[int]:
        """The shuffle key of the call a recomputation repeats (None: a new call draws the next)."""
        if not replay:
            return None
        if id(self) not in context.shuffle_keys:
            raise RuntimeError(f"StableMoELayer {self.layer_number}: recomputing a call that did not shuffle")
        return context.shuffle_keys[id(self)]

    def set_layer_number(self, layer_number: int) -> None:
        """Called once after construction (megatron's TransformerLayer / our MoE block).

        Also the point where the layer's number is known, so the expert weights are
        initialised here, per global expert (see ExpertStack.initialize); the seed is the run's
        torch seed, identical on every rank.
        """
        super().set_layer_number(layer_number)
        if self.shuffle is not None:
            self.shuffle.seed, self.shuffle.layer_number = torch.initial_seed(), layer_number
        self.experts.initialize(torch.initial_seed(), layer_number, self.moe.expert_output_init)

    @property
    def stage(self) -> int:
        return getattr(self.router, "stage", 1)
