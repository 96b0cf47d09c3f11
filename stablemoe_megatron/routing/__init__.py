"""Routing algorithms as pure torch functions (tensors in, tensors out; no process groups).

One module per algorithm; each defines and registers its :class:`RoutingAlgorithm` (see
:mod:`.registry`) under its ``--moe-router`` name, so the command line, the Megatron model and the
exported model ask the registry what an algorithm does instead of comparing names:

=================  =========================================================================
``stablemoe``      :mod:`.stablemoe` (stage 1) + :mod:`.distill` / :mod:`.distilled` (stage 2)
``switch``         :mod:`.switch`
``base``           :mod:`.base` (balanced auction in training, greedy at inference)
``hash``           :mod:`.hash`
``expert-choice``  :mod:`.expert_choice` (threshold routing at evaluation)
=================  =========================================================================

Losses are UNWEIGHTED per-token means over a "counting set" (see :mod:`.common`).

Importing this package imports nothing heavy: the names it exports (``_EXPORTS``) are loaded from
their modules (torch) on first access (``routing.centroid_scores`` or ``from ... import``), so the
registry and the command line that asks it stay free of torch. The distilled-router modules live in
:mod:`stablemoe_megatron.routing.distilled` (torch.nn).
"""
from __future__ import annotations

import importlib

# {module: the names this package exports from it}
_EXPORTS = {
    "registry": ("RoutingAlgorithm", "StateBuffer", "register_routing", "get_routing", "routing_names",
                 "distillable_names"),
    "common": ("tokens_per_expert",),
    "stablemoe": ("centroid_scores", "greedy_assignment", "sigmoid_gate", "chosen_sigmoid_gate", "balance_loss"),
    "distill": ("distillation_loss", "distillation_agreement", "distilled_assignment"),
    "switch": ("router_logits", "router_probs", "softmax_gate", "top1", "switch_aux_loss", "z_loss"),
    "base": ("balanced_capacities", "balanced_assignment"),
    "hash": ("random_hash_table", "frequency_balanced_hash_table", "hash_assignment"),
    "expert_choice": ("expert_capacity", "expert_choice_assignment", "kth_largest_probs", "threshold_assignment"),
    "capacity": ("expert_capacity_per_expert", "capacity_keep_mask"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    """Load an exported function from its module on first access (then it is a plain attribute)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
