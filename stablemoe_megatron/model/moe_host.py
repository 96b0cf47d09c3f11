"""What every model family with MoE layers shares: the token-id plumbing and the trainer's MoE hooks.

megatron's transformer layers pass only hidden states to their MLP, so a model hands the
micro-batch's token ids to its MoE layers before each forward (:meth:`MoEHost.hand_token_ids`):
the hash router and the distilled StableMoE router route by token id, and the host (CPU) copy lets
them count tokens per expert without a device sync. The trainer drives the stage switch, the
metrics and the per-step router bookkeeping through the same methods, whatever the family: the
GPT model mixes this in today; an encoder-decoder model mixes it in the same way (handing each
stack its own ids: source ids to the encoder's MoE layers, target ids to the decoder's).

Activation recomputation re-runs checkpointed layers during the backward, possibly after the next
micro-batch's forward has handed new ids (pipeline schedules run forward i+1 before backward i).
With recomputation on, each forward's :class:`~stablemoe_megatron.moe.layer.MoEForwardContext`
(its ids and the per-call shuffle keys) is kept with its autograd graph: a hook on the model's
output, which runs first when that micro-batch's backward reaches this model, hands the context
back to the MoE layers (``replay_context``) before any of its layers is recomputed.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import torch

from stablemoe_megatron.moe.layer import MoEForwardContext, StableMoELayer


class MoEHost:
    """Mixin for a megatron model that contains :class:`StableMoELayer` modules."""

    moe_layers: List[StableMoELayer]

    def collect_moe_layers(self) -> None:
        """Find this pipeline stage's MoE layers (call at the end of ``__init__``); with activation
        recomputation, keep each forward's token ids for its backward (module docstring)."""
        self.moe_layers = [m for m in self.modules() if isinstance(m, StableMoELayer)]
        self._moe_contexts: List[Tuple[List[StableMoELayer], MoEForwardContext]] = []  # this forward's
        self._keeps_moe_contexts = any(layer.config.recompute_granularity is not None for layer in self.moe_layers)
        if self._keeps_moe_contexts:
            self.register_forward_hook(_keep_context_for_backward)

    def hand_token_ids(self, token_ids: torch.Tensor, host_token_ids=None, layers=None) -> None:
        """Give ``token_ids`` [B, S] (and their CPU copy) to ``layers`` (default: every MoE layer),
        as one context for this forward."""
        context = MoEForwardContext(token_ids, host_token_ids)
        layers = self.moe_layers if layers is None else list(layers)
        if self._keeps_moe_contexts:
            self._moe_contexts.append((layers, context))
        for layer in layers:
            layer.set_forward_context(context)

    # -- stages and metrics (the trainer drives these) ------------------------------------------
    def distilled_routers(self):
        return [layer.router for layer in self.moe_layers if getattr(layer.router, "distilled", None) is not None]

    def enter_stage_two(self) -> None:
        """Freeze every distilled router (idempotent)."""
        for router in self.distilled_routers():
            if not router.frozen:
                router.freeze_distilled()

    @property
    def stage(self) -> int:
        """StableMoE stage of the model: 2 once every distilled router is frozen, else 1."""
        routers = self.distilled_routers()
        return 2 if routers and all(r.frozen for r in routers) else 1

    def moe_metrics(self, reset: bool = True) -> Dict[int, Dict[str, torch.Tensor]]:
        """{global layer number: metric snapshot} for this stage's MoE layers."""
        out = {}
        for layer in self.moe_layers:
            out[layer.layer_number] = layer.metrics.snapshot()
            if reset:
                layer.metrics.reset()
        return out

    def start_moe_step(self, iteration: int) -> None:
        """Before training step ``iteration`` (the count of steps done): seeds what is random per
        step (the ``--moe-token-shuffle`` permutations), so a resumed run repeats the uninterrupted one."""
        for layer in self.moe_layers:
            if layer.shuffle is not None:
                layer.shuffle.start_step(iteration)

    def finalize_moe_step(self, dp_group=None) -> None:
        """Per-optimizer-step router bookkeeping (Expert Choice thresholds)."""
        for layer in self.moe_layers:
            finalize = getattr(layer.router, "finalize_step", None)
            if finalize is not None:
                finalize(dp_group)


def _keep_context_for_backward(model: MoEHost, args, output) -> None:
    """Forward hook: hook the output so that its backward first hands this forward's contexts back.

    The hook belongs to the output's autograd node, so it lives (and keeps the ids) exactly as
    long as the graph of this micro-batch; it returns None (the gradient passes unchanged).
    """
    contexts, model._moe_contexts = model._moe_contexts, []
    tensor = output if isinstance(output, torch.Tensor) else next(
        (item for item in (output or ()) if isinstance(item, torch.Tensor)), None)
    if contexts and tensor is not None and tensor.requires_grad and model.training:
        tensor.register_hook(functools.partial(_replay, contexts))


def _replay(contexts, grad: torch.Tensor) -> None:
    """Tensor hook (first in a micro-batch's backward): each MoE layer gets its forward's context."""
    for layers, context in contexts:
        for layer in layers:
            layer.replay_context = context
