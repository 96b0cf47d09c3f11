"""Layer specs: megatron-core's GPT layer spec with our MoE layers placed as configured.

Backends (``--transformer-impl``, :func:`use_transformer_engine`): transformer-engine, or megatron's
local (plain torch) modules; unset, transformer-engine when it imports and CUDA is present
(``HAVE_TE``), else local. With the local backend and no apex, megatron's ``WrappedTorchNorm``
refuses sequence parallelism; :class:`SequenceParallelTorchNorm` is the same torch norm with its
parameters marked ``sequence_parallel`` so megatron all-reduces their grads over the TP group.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.model.config import transformer_engine_missing
from stablemoe_megatron.moe.block import TransformerLayerWithMoEBlock, TransformerLayerWithMoEBlockSubmodules
from stablemoe_megatron.moe.config import MoEConfig
from stablemoe_megatron.moe.experts import expert_spec_with_bias_fix
from stablemoe_megatron.moe.layer import StableMoELayer
from stablemoe_megatron.moe.routers import router_class

# optional: transformer-engine (GPU only), usable when it imports and CUDA is present
HAVE_TE = transformer_engine_missing() is None


def use_transformer_engine(transformer_impl: Optional[str]) -> bool:
    """Whether the layers are transformer-engine modules for ``--transformer-impl`` (None: ``HAVE_TE``).

    ``local`` forces megatron's plain torch modules even where transformer-engine is usable;
    ``transformer_engine`` where it cannot run is a ConfigError saying what is missing (also
    checked by ``ModelConfig.validate``, before any work).
    """
    if transformer_impl is None:
        return HAVE_TE
    if transformer_impl == "local":
        return False
    if transformer_impl != "transformer_engine":
        raise ConfigError(f"--transformer-impl must be local or transformer_engine, got {transformer_impl!r}")
    missing = transformer_engine_missing()
    if missing:
        raise ConfigError(f"--transformer-impl transformer_engine cannot run here: {missing}. "
                          f"Use --transformer-impl local")
    return True


class SequenceParallelTorchNorm:
    """torch LayerNorm / RMSNorm whose parameters carry ``sequence_parallel`` (see module doc)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _dense_layer_spec(use_te: bool) -> ModuleSpec:
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec()
    if not gpt_layer_specs.HAVE_APEX:
        spec.submodules.input_layernorm = SequenceParallelTorchNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def _backend(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def moe_layer_spec(moe: MoEConfig, vocab_size: int, use_te: bool, num_sublayers: int, pre_norm: bool,
                   host_ep_group=None) -> ModuleSpec:
    """ModuleSpec of a :class:`StableMoELayer` with megatron's expert MLPs for the backend."""
    megatron_moe = get_moe_module_spec_for_backend(_backend(use_te), num_experts=moe.num_experts,
                                                   moe_grouped_gemm=use_te)
    router = functools.partial(router_class(moe.router), moe=moe, vocab_size=vocab_size)
    return ModuleSpec(
        module=StableMoELayer,
        submodules=MoESubmodules(experts=expert_spec_with_bias_fix(megatron_moe.submodules.experts), router=router),
        params=dict(moe=moe, vocab_size=vocab_size, num_sublayers=num_sublayers, pre_norm=pre_norm,
                    host_ep_group=host_ep_group),
    )


def decoder_layer_specs(config, moe: MoEConfig, vocab_size: int, use_te: bool = False, host_ep_group=None,
                        dense_spec=None):
    """One ModuleSpec per transformer layer of the whole model (before pipeline slicing).

    ``dense_spec(use_te)`` gives a fresh dense layer spec (default: megatron's GPT layer; the
    encoder-decoder model passes its encoder / decoder layers); MoE layers are placed in it as
    ``moe.moe_placement`` says.
    """
    specs = []
    placement = moe.moe_placement(config.num_layers)
    for layer_number in range(1, config.num_layers + 1):
        spec = (dense_spec or _dense_layer_spec)(use_te)
        where = placement.get(layer_number)
        if where == "mlp":
            spec.submodules.mlp = moe_layer_spec(moe, vocab_size, use_te, 1, False, host_ep_group)
            if use_te:  # TE's dense spec fuses the pre-MLP norm into fc1; the MoE layer needs it back
                from megatron.core.extensions.transformer_engine import TENorm

                spec.submodules.pre_mlp_layernorm = TENorm
        elif where is not None:
            block = moe_layer_spec(moe, vocab_size, use_te, moe.sublayers_per_moe_layer(), True, host_ep_group)
            fields = {name: getattr(spec.submodules, name) for name in spec.submodules.__dataclass_fields__}
            spec = ModuleSpec(
                module=TransformerLayerWithMoEBlock,
                submodules=TransformerLayerWithMoEBlockSubmodules(
                    **fields, moe_block=block, moe_block_position=where),
            )
        specs.append(spec)
    return specs


def decoder_block_spec(config, moe: MoEConfig, vocab_size: int, use_te: bool = False,
                       host_ep_group=None, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None, dense_spec=None) -> TransformerBlockSubmodules:
    """The TransformerBlock spec of this pipeline stage (megatron's slicing by layer offset)."""
    specs = decoder_layer_specs(config, moe, vocab_size, use_te, host_ep_group, dense_spec)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = gpt_layer_specs.LNImpl if gpt_layer_specs.HAVE_APEX else SequenceParallelTorchNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset: offset + count], layer_norm=final_norm)
