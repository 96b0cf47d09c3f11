"""The GPT model: megatron-core's GPTModel that hands token ids to its MoE layers.

:func:`transformer_config` turns our config dataclasses into megatron's ``TransformerConfig``
(CPU-safe flags when CUDA is absent); :func:`transformer_config_for` does it for a whole RunConfig
(model, MoE, parallel layout, precision: what the trainer and the checkpoint converter build);
:func:`build_model` builds this rank's pipeline stage.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.model.config import ModelConfig
from stablemoe_megatron.model.specs import decoder_block_spec, use_transformer_engine
from stablemoe_megatron.moe.config import MoEConfig
from stablemoe_megatron.model.moe_host import MoEHost


def transformer_config(model: ModelConfig, moe: MoEConfig, *, tensor_parallel: int = 1,
                       pipeline_parallel: int = 1, expert_parallel: int = 1,
                       sequence_parallel: bool = False, bf16: bool = False,
                       fp16: bool = False) -> TransformerConfig:
    """megatron TransformerConfig for this model and layout.

    Linear biases as ``--add-bias-linear`` / ``--disable-bias-linear`` (megatron adds each expert's
    fc2 bias inside the expert; our routers stay bias-free); the FFN activation of ``--activation``
    or ``--swiglu`` (:func:`_activation_kwargs`).
    Without CUDA: CPU initialisation, no fused kernels, and non-batched p2p (batched p2p gives
    wrong pipeline gradients under gloo; see docs/MEGATRON_CPU.md).
    """
    cuda, te = torch.cuda.is_available(), use_transformer_engine(model.transformer_impl)
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    kwargs = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_size,
        num_attention_heads=model.num_attention_heads, hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout, init_method_std=model.init_method_std,
        normalization=model.normalization, add_bias_linear=model.add_bias_linear,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size() or 1,  # the groups'
        sequence_parallel=sequence_parallel, bf16=bf16, fp16=fp16, params_dtype=dtype, pipeline_dtype=dtype,
        batch_p2p_comm=cuda, use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=te, bias_activation_fusion=False, bias_dropout_fusion=cuda,
        masked_softmax_fusion=te, persist_layer_norm=False, apply_rope_fusion=te,
    )
    kwargs.update(_activation_kwargs(model.activation, model.swiglu))
    if moe.enabled:
        kwargs.update(num_moe_experts=moe.num_experts, moe_router_topk=moe.effective_router_topk,
                      moe_router_pre_softmax=moe.effective_router_pre_softmax,
                      moe_ffn_hidden_size=moe.expert_ffn_hidden_size or model.ffn_size,
                      hetereogenous_dist_checkpoint=True)
    kwargs.update(model.recompute_kwargs(pipeline_parallel, te))  # checked: ConfigError naming our flags
    return TransformerConfig(**kwargs)


def _activation_kwargs(activation: str, swiglu: bool = False) -> dict:
    """TransformerConfig settings for ``--activation``; empty for gelu (megatron's default F.gelu).

    megatron's MLP and expert modules (SequentialMLP, TEGroupedMLP) apply ``config.activation_func``
    to fc1's output, so this one setting covers the backbone MLPs and every expert FFN sublayer.
    gelu passes nothing, so its config (and training) stays exactly what it was before the option.
    ``bias_activation_fusion`` is off either way (no linear biases), so no gelu-specific fused
    kernel is selected; transformer-engine's own activation modules (``use_te_activation_func``)
    stay off too, so both backends call the torch function.
    """
    if swiglu:  # Megatron-LM's --swiglu: fc1 [2 * ffn, h], SiLU(first half) * second half
        return {"gated_linear_unit": True, "activation_func": torch.nn.functional.silu}
    if activation == "gelu":
        return {}
    if activation == "relu":
        return {"activation_func": torch.nn.functional.relu}
    raise ConfigError(f"--activation must be gelu or relu, got {activation!r}")


def transformer_config_for(run) -> TransformerConfig:
    """megatron TransformerConfig of a RunConfig: its model, MoE, parallel layout and precision.

    The one translation of a run's settings, so a model built by the trainer and one built by the
    checkpoint converter for the same RunConfig have the same sharding.
    """
    p = run.parallel
    config = transformer_config(run.model, run.moe, tensor_parallel=p.tensor_model_parallel_size,
                                pipeline_parallel=p.pipeline_model_parallel_size,
                                expert_parallel=p.expert_model_parallel_size,
                                sequence_parallel=p.sequence_parallel, bf16=run.training.bf16,
                                fp16=run.training.fp16)
    config.attention_softmax_in_fp32 = run.megatron.attention_softmax_in_fp32
    return config


class StableMoEGPTModel(MoEHost, GPTModel):
    """GPTModel whose forward also takes the token ids (and their CPU copy) for the MoE routers.

    ``token_ids`` default to ``input_ids``; pass ``input_ids`` on every pipeline stage (megatron
    only embeds them on the first). ``host_token_ids`` (the batch before it was moved to the GPU)
    lets token-id routing (hash, frozen StableMoE) count tokens per expert without a device sync.
    The MoE hooks (stage, metrics, token-id plumbing) come from :class:`~.moe_host.MoEHost`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.collect_moe_layers()

    def forward(self, input_ids, position_ids, attention_mask, *args, token_ids=None,
                host_token_ids=None, **kwargs):
        self.hand_token_ids(input_ids if token_ids is None else token_ids, host_token_ids)
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)


def build_model(model: ModelConfig, moe: MoEConfig, vocab_size: int, config: TransformerConfig,
                host_ep_group=None, vp_stage: Optional[int] = None) -> StableMoEGPTModel:
    """This rank's pipeline stage of the GPT model (``vocab_size`` already padded)."""
    spec = decoder_block_spec(config, moe, vocab_size, use_te=use_transformer_engine(model.transformer_impl),
                              host_ep_group=host_ep_group, vp_stage=vp_stage)
    return StableMoEGPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
        max_sequence_length=model.max_positions,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
    )
