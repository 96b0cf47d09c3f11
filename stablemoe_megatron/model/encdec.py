"""The encoder-decoder (translation) model: megatron-core's T5Model with our MoE layers.

Built from megatron-core's own encoder-decoder pieces: ``T5Model`` (shared token + learned position
embeddings, an encoder ``TransformerBlock`` of self-attention layers, a decoder ``TransformerBlock``
of causal self-attention + cross-attention layers, the LM head tied to the embedding) and the T5
layer specs of ``megatron.core.models.T5.t5_spec``. Attention is megatron's.

MoE as in the paper's translation setting: the MoE placement of ``--moe-layer-freq`` /
``--moe-layer-positions`` applies to each stack (paper layout "middle": one MoE block after
encoder block L/2 and one after decoder block L/2, e.g. after block 3 of 6). Each stack's MoE
layers get their own token ids: the encoder's the source ids, the decoder's the target-prefix ids
(the decoder input, so a decoder token's distilled routing reads only its own, causal, input).
MoE layers are numbered ``1..L_enc`` in the encoder and ``L_enc + 1 .. L_enc + L_dec`` in the
decoder (the decoder's block after its layer 3 of 6 is "layer 9" in metrics, probes and reports),
so every MoE layer of the model has its own number.

The loss: megatron's vocab-parallel cross-entropy per target token, with ``--label-smoothing`` while
training (megatron's smoothing: ``(1 - a') * nll - a' * mean_v log p_v``, ``a' = a V / (V - 1)``);
in evaluation mode the plain NLL, so validation perplexity is comparable across settings.

Pipeline parallelism is refused (``ModelConfig.validate``): megatron-core 0.16's schedules pass one
activation tensor between stages while an encoder-decoder stage needs two (decoder state and
encoder output); tensor, sequence, expert and data parallelism work as for the GPT model.
"""
from __future__ import annotations

import dataclasses
import torch
from megatron.core import tensor_parallel
from megatron.core.models.T5 import t5_spec
from megatron.core.models.T5.t5_model import T5Model
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from stablemoe_megatron.model.moe_host import MoEHost
from stablemoe_megatron.model.specs import (
    SequenceParallelTorchNorm, decoder_layer_specs, use_transformer_engine)

_NORMS = ("input_layernorm", "pre_cross_attn_layernorm", "pre_mlp_layernorm")


def _local(layer_spec: ModuleSpec) -> ModuleSpec:
    """megatron's local T5 layer spec with our torch norms where apex is missing (as for GPT)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if not gpt_layer_specs.HAVE_APEX:
        for name in _NORMS:
            if getattr(layer_spec.submodules, name) is not t5_spec.IdentityOp:
                setattr(layer_spec.submodules, name, SequenceParallelTorchNorm)
    return layer_spec


def encoder_layer_spec(use_te: bool) -> ModuleSpec:
    """A fresh dense encoder layer spec (padding-masked self-attention, MLP)."""
    if use_te:
        return t5_spec.encoder_model_with_transformer_engine_default_spec()
    return _local(t5_spec.encoder_model_with_local_spec())


def decoder_layer_spec(use_te: bool) -> ModuleSpec:
    """A fresh dense decoder layer spec (causal self-attention, cross-attention, MLP)."""
    if use_te:
        return t5_spec.decoder_model_with_transformer_engine_default_spec()
    return _local(t5_spec.decoder_model_with_local_spec())


def _final_norm(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.LNImpl if gpt_layer_specs.HAVE_APEX else SequenceParallelTorchNorm


def stack_spec(config, moe, vocab_size: int, use_te: bool, host_ep_group, dense_spec) -> TransformerBlockSubmodules:
    """One stack's TransformerBlock spec: ``config.num_layers`` layers with the MoE placement."""
    specs = decoder_layer_specs(config, moe, vocab_size, use_te, host_ep_group, dense_spec)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=_final_norm(use_te))


class StableMoEEncoderDecoderModel(MoEHost, T5Model):
    """T5Model whose forward hands source ids to the encoder's MoE layers and target-prefix ids
    to the decoder's; the MoE hooks come from :class:`~.moe_host.MoEHost`.

    forward(source_ids [B, S], target_input_ids [B, T], source_padding [B, S] bool (True = pad),
    labels [B, T] or None) -> per-token loss [B, T] (labels given) or logits [B, T, V/tp].
    """

    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = label_smoothing
        self.encoder_moe_layers = _moe_layers_of(self.encoder)
        self.decoder_moe_layers = _moe_layers_of(self.decoder)
        offset = self.encoder_config.num_layers
        for layer in self.decoder_moe_layers:  # every MoE layer its own number (module docstring)
            layer.set_layer_number(offset + layer.layer_number)
        self.collect_moe_layers()

    def forward(self, source_ids, target_input_ids, source_padding, labels=None, *,
                host_source_ids=None, host_target_ids=None):
        self.hand_token_ids(source_ids, host_source_ids, layers=self.encoder_moe_layers)
        self.hand_token_ids(target_input_ids, host_target_ids, layers=self.decoder_moe_layers)
        encoder_mask, cross_mask = attention_masks(source_padding, target_input_ids.shape[1])
        return super().forward(source_ids, target_input_ids, encoder_mask, None, cross_mask, lm_labels=labels)

    def compute_language_model_loss(self, labels, logits):
        """[B, T] per-token loss; label smoothing in training only (module docstring)."""
        smoothing = self.label_smoothing if self.training else 0.0
        loss = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), labels.transpose(0, 1).contiguous(), label_smoothing=smoothing)
        return loss.transpose(0, 1).contiguous()


def attention_masks(source_padding: torch.Tensor, target_length: int):
    """megatron's masks (True = not attended): encoder self-attention [B, 1, S, S] and
    cross-attention [B, 1, T, S], both hiding the padded source positions (keys). The decoder's
    self-attention is causal (megatron builds that mask), so its padding needs none."""
    keys = source_padding.bool()[:, None, None, :]
    batch, length = source_padding.shape
    return keys.expand(batch, 1, length, length), keys.expand(batch, 1, target_length, length)


def _moe_layers_of(block):
    from stablemoe_megatron.moe.layer import StableMoELayer

    return [] if block is None else [m for m in block.modules() if isinstance(m, StableMoELayer)]


def stack_configs(run, tconfig):
    """(encoder TransformerConfig, decoder TransformerConfig): ``tconfig`` with each stack's depth."""
    model = run.model
    return (dataclasses.replace(tconfig, num_layers=model.encoder_layers),
            dataclasses.replace(tconfig, num_layers=model.decoder_layers))


def build_model(run, vocab_size: int, tconfig, host_ep_group=None) -> StableMoEEncoderDecoderModel:
    """The whole encoder-decoder model on this rank (``vocab_size`` already padded; no pipeline)."""
    model, moe = run.model, run.moe
    use_te = use_transformer_engine(model.transformer_impl)
    encoder_config, decoder_config = stack_configs(run, tconfig)
    encoder = stack_spec(encoder_config, moe, vocab_size, use_te, host_ep_group, encoder_layer_spec)
    decoder = stack_spec(decoder_config, moe, vocab_size, use_te, host_ep_group, decoder_layer_spec)
    from megatron.core.process_groups_config import ProcessGroupCollection

    return StableMoEEncoderDecoderModel(
        config=decoder_config, encoder_config=encoder_config, transformer_encoder_layer_spec=encoder,
        transformer_decoder_layer_spec=decoder, vocab_size=vocab_size, max_sequence_length=model.max_positions,
        pre_process=True, post_process=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type, label_smoothing=run.training.label_smoothing,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups())  # T5Model's default lacks the expert groups


def target_inputs(targets: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T] decoder inputs of targets [B, T]: BOS, then the targets shifted right by one."""
    return torch.cat([torch.full_like(targets[:, :1], bos_id), targets[:, :-1]], dim=1)

