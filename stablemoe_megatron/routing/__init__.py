"""Routing algorithms as pure torch functions (tensors in, tensors out; no process groups).

One module per algorithm; each registers a :class:`RoutingAlgorithm` (see :mod:`.types`) so the
MoE layer and the command line can ask what an algorithm needs:

================  ==========================================================================
``stablemoe``     :mod:`.stablemoe` (stage 1) + :mod:`.distill` / :mod:`.distilled` (stage 2)
``switch``        :mod:`.switch`
``base``          :mod:`.base` (balanced auction in training, greedy at inference)
``hash``          :mod:`.hash`
``expert_choice`` :mod:`.expert_choice` (threshold routing at evaluation)
``dense``         no MoE layer (registered here; no functions)
================  ==========================================================================

Losses are UNWEIGHTED per-token means over a "counting set" (see :mod:`.common`).
Importing this package imports torch only. The distilled-router modules live in
:mod:`stablemoe_megatron.routing.distilled` (torch.nn) and are not imported here.
"""
from .base import balanced_assignment, balanced_capacities
from .capacity import capacity_keep_mask, expert_capacity_per_expert
from .common import tokens_per_expert
from .distill import distillation_agreement, distillation_loss, distilled_assignment
from .expert_choice import (
    expert_capacity,
    expert_choice_assignment,
    kth_largest_probs,
    threshold_assignment,
)
from .hash import frequency_balanced_hash_table, hash_assignment, random_hash_table
from .stablemoe import balance_loss, centroid_scores, chosen_sigmoid_gate, greedy_assignment, sigmoid_gate
from .switch import router_probs, switch_aux_loss, top1, z_loss
from .types import RoutingAlgorithm, get_routing, register_routing, routing_names

register_routing(
    "dense",
    learned=False,
    token_choice=False,
    uses_token_ids=False,
    gate="none",
    description="Dense baseline: no MoE layer (or a dense FFN of matching size)",
)

__all__ = [
    "RoutingAlgorithm",
    "register_routing",
    "get_routing",
    "routing_names",
    "tokens_per_expert",
    "centroid_scores",
    "greedy_assignment",
    "sigmoid_gate",
    "chosen_sigmoid_gate",
    "balance_loss",
    "distillation_loss",
    "distillation_agreement",
    "distilled_assignment",
    "router_probs",
    "top1",
    "switch_aux_loss",
    "z_loss",
    "balanced_capacities",
    "balanced_assignment",
    "random_hash_table",
    "frequency_balanced_hash_table",
    "hash_assignment",
    "expert_capacity",
    "expert_choice_assignment",
    "kth_largest_probs",
    "threshold_assignment",
    "expert_capacity_per_expert",
    "capacity_keep_mask",
]
