"""Paper layout: an MoE block of K-deep expert stacks attached to a transformer layer.

The paper inserts ONE MoE layer between two transformer blocks (after block L/2 by default;
before block 1 = "bottom", after block L = "top"; "scattered" puts K single-sublayer MoE layers
after blocks L/(K+1), 2L/(K+1), ...). Megatron builds a decoder as a list of transformer layers
(which is what pipeline parallelism splits), so the block is attached to the neighbouring layer:
:class:`TransformerLayerWithMoEBlock` runs megatron's layer and then (or first) the block

    h_out = h + g_t * (z_K - h)          (see stablemoe_megatron.moe.experts)

and lives on whichever pipeline stage holds that layer. Activation recomputation follows from
that: full recomputation re-runs the block with its layer, ``--recompute-modules moe`` checkpoints
the block's MoE layer (:class:`~stablemoe_megatron.moe.layer.StableMoELayer` does both correctly).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass
class TransformerLayerWithMoEBlockSubmodules(TransformerLayerSubmodules):
    """Megatron's layer submodules plus the MoE block and where it runs ("before" / "after")."""

    moe_block: Union[ModuleSpec, type, None] = None
    moe_block_position: str = "after"


class TransformerLayerWithMoEBlock(TransformerLayer):
    """A megatron TransformerLayer followed (or preceded) by a residual MoE block."""

    def __init__(self, config, submodules: TransformerLayerWithMoEBlockSubmodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, pg_collection=None, vp_stage: Optional[int] = None,
                 **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage, **kwargs)
        if submodules.moe_block_position not in ("before", "after"):
            raise ValueError(f"moe_block_position must be 'before' or 'after', got {submodules.moe_block_position!r}")
        self.moe_block_position = submodules.moe_block_position
        self.moe_block = build_module(submodules.moe_block, config=config, pg_collection=self.pg_collection)
        self.moe_block.set_layer_number(self.layer_number)

    moe_bypassed = False  # set by :func:`bypass_moe_blocks` (evaluation diagnostics only)

    def _moe(self, hidden_states):
        if self.moe_bypassed:
            return hidden_states
        output, _ = self.moe_block(hidden_states)
        return hidden_states + output

    def forward(self, *args, **kwargs):
        if self.moe_block_position == "before":
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = self._moe(kwargs["hidden_states"])
            else:
                args = (self._moe(args[0]), *args[1:])
            return super().forward(*args, **kwargs)
        output, context = super().forward(*args, **kwargs)
        return self._moe(output), context


@contextmanager
def bypass_moe_blocks(model_chunks):
    """Within the block, every :class:`TransformerLayerWithMoEBlock` in ``model_chunks`` (modules)
    returns its input unchanged (h_out = h): the backbone alone, with the trained weights.

    A diagnostic for evaluation (``--eval-moe-bypass``): no router or expert runs, so no
    expert-parallel communication happens either (every rank must bypass together).
    """
    layers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TransformerLayerWithMoEBlock)]
    for layer in layers:
        layer.moe_bypassed = True
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.moe_bypassed = False
