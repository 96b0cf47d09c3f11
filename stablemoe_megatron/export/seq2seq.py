"""A small pure-torch encoder-decoder that runs a translation model: no megatron at run time.

    model = ExportedSeq2Seq.from_pretrained("exported/")          # or seq2seq_export.load_checkpoint(...)
    memory = model.encode(source_ids, source_padding)             # [B, S] ids, [B, S] bool (True = pad)
    state = model.start(memory, source_padding)                   # cross-attention keys/values, once
    logits = model.step(state, next_ids)                          # [N, s] -> [N, s, V]; caches keys/values

It computes the function of :class:`stablemoe_megatron.model.encdec.StableMoEEncoderDecoderModel`
(megatron-core's T5Model with our MoE layers) in evaluation mode:

* embeddings: token + learned position (positions from 0 in both the source and the target), or
  RoPE in the self-attentions (base 10000, T5Model's);
* encoder layer ``x += Attn(LN(x))`` (the padded source positions masked as keys), ``x += MLP(LN(x))``;
  decoder layer ``x += CausalAttn(LN(x))``, ``x += CrossAttn(LN(x), memory)`` (padded source keys
  masked), ``x += MLP(LN(x))``; a final norm per stack (the encoder's output is the memory);
* attention: softmax(q k^T / sqrt(head_dim)) in fp32 with masked scores set to -10000 (megatron's
  ``attention_mask_func``), linear biases when the run had them (``--add-bias-linear``, the
  default of translation runs), exact GeLU or ReLU;
* logits ``x E^T + b`` against the tied word embedding plus T5's LM-head bias (or an untied head);
* MoE layers: :class:`stablemoe_megatron.export.model.MoE` (evaluation routing of the trainer's own
  routing functions, paper or Megatron layout), with the experts' biases. Encoder MoE layers route
  by the source ids, decoder MoE layers by the decoder input ids (EOS y_1 .. y_t). Routing is
  per token at evaluation, so decoding one token at a time with the cache gives what the whole
  prefix gives; a context-dependent distilled router (cnn / transformer, causal) reads the cached
  prefix of ids.

Names of the tensors (also those of ``model.safetensors``; ``S`` = ``encoder`` or ``decoder``)::

    embed_tokens.weight [V, d]; embed_positions.weight [P, d] (learned positions only)
    S.layers.i.attn_norm.{weight,bias}; S.layers.i.attn.{q,k,v,o}_proj.{weight,bias}
    decoder.layers.i.cross_attn_norm.*; decoder.layers.i.cross_attn.{q,k,v,o}_proj.*
    S.layers.i.mlp_norm.*; S.layers.i.mlp.{fc1,fc2}.{weight,bias}  (dense MLP)
    S.layers.i.moe.*  as export.names (router, distilled, hash_table, experts.k.fc1/fc2/norm) + biases
    S.final_norm.*; lm_head.bias [V] (tied head) or lm_head.weight [V, d] (untied)
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from stablemoe_megatron import routing
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.model import (
    MoE, ExpertSublayer, _norm, activation_function, apply_rotary, load_weights_strictly, materialize, rotary_tables)
from stablemoe_megatron.export.schema import CONFIG_FILE, WEIGHTS_FILE, ExportedConfig, read_config_values

SECTION = "encoder_decoder"  # config.json's extra section of a translation export
MASK_VALUE = -10000.0  # megatron's attention_mask_func fills masked scores with this


@dataclass
class Seq2SeqArch:
    """What config.json's ``encoder_decoder`` section adds to :class:`ExportedConfig`.

    ExportedConfig's ``num_layers`` is ``encoder_layers + decoder_layers`` and its ``moe.layers``
    number the layers of both stacks in one row (0-based): encoder layer i is ``i``, decoder layer
    i is ``encoder_layers + i``, as the trainer numbers MoE layers (model/encdec.py).
    """

    encoder_layers: int
    decoder_layers: int
    add_bias_linear: bool
    source_length: int  # longest source of training (tokens, tag and EOS included)
    target_length: int  # longest target of training (tokens, EOS included)


def read_seq2seq_config(export_dir) -> Tuple[ExportedConfig, Seq2SeqArch]:
    """(ExportedConfig, Seq2SeqArch) of a translation export; ConfigError for a GPT export."""
    path, values = read_config_values(export_dir)
    section = values.pop(SECTION, None)
    if section is None:
        raise ConfigError(f"{export_dir}: a GPT (decoder-only) export, not a translation model: its {CONFIG_FILE} "
                          f"has no {SECTION!r} section (export a --model-family encoder_decoder checkpoint)")
    try:
        arch = Seq2SeqArch(**section)
    except TypeError as exc:
        raise ConfigError(f"{path}: {SECTION}: {exc}") from None
    return ExportedConfig.from_dict(values, str(path)), arch


def write_seq2seq_config(export_dir, config: ExportedConfig, arch: Seq2SeqArch) -> None:
    values = {**config.to_dict(), SECTION: dataclasses.asdict(arch)}
    (Path(export_dir) / CONFIG_FILE).write_text(json.dumps(values, indent=1) + "\n")


class Attention(nn.Module):
    """q/k/v/o projections; self-attention (GQA groups) or cross-attention (keys from the memory)."""

    def __init__(self, config: ExportedConfig, bias: bool, groups: Optional[int] = None):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.groups = groups or self.heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.groups * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.groups * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)

    def query(self, x: torch.Tensor, angles: Optional[torch.Tensor]) -> torch.Tensor:
        """x ``[B, s, d]`` -> q ``[B, H, s, hd]``."""
        q = self.q_proj(x).view(*x.shape[:2], self.heads, self.head_dim)
        return (q if angles is None else apply_rotary(q, angles)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, angles: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, s, d]`` -> (k, v) ``[B, G, s, hd]``."""
        k = self.k_proj(x).view(*x.shape[:2], self.groups, self.head_dim)
        v = self.v_proj(x).view(*x.shape[:2], self.groups, self.head_dim)
        k = k if angles is None else apply_rotary(k, angles)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q ``[B, H, s, hd]``, k/v ``[B, G, t, hd]``, mask ``[B|1, 1, s, t]`` (True = hidden) -> ``[B, s, d]``."""
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(mask, MASK_VALUE)
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
        return self.o_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


class MLP(nn.Module):
    """Dense FFN ``fc2(act(fc1 x + b1)) + b2`` (biases optional)."""

    def __init__(self, hidden: int, ffn: int, activation, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class BiasedExpertSublayer(ExpertSublayer):
    """:class:`ExpertSublayer` with megatron's expert biases: fc1.bias ``[N, F]``, fc2.bias ``[N, d]``."""

    def __init__(self, config: ExportedConfig, moe, with_norm: bool):
        super().__init__(config, moe, with_norm)
        n, d, f = moe.num_experts, config.hidden_size, moe.expert_ffn_hidden_size
        self.fc1.bias = nn.Parameter(torch.zeros(n, f))
        self.fc2.bias = nn.Parameter(torch.zeros(n, d))

    def ffn(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        hidden = self.activation(F.linear(x, self.fc1.weight[expert], self.fc1.bias[expert]))
        return F.linear(hidden, self.fc2.weight[expert], self.fc2.bias[expert])


class Seq2SeqMoE(MoE):
    """:class:`MoE` with expert biases (``bias``) and routing of new tokens after a cached prefix.

    ``forward(hidden [B, s, d], token_ids [B, s], context_ids [B, t >= s] or None)``: a
    context-dependent distilled router (stage 2) scores ``context_ids`` (the ids up to and
    including the new ones) and routes the new tokens by its last ``s`` positions.
    """

    def __init__(self, config: ExportedConfig, moe, sublayers: int, paper_block: bool, bias: bool):
        super().__init__(config, moe, sublayers, paper_block)
        if bias:
            self.experts = nn.ModuleList([BiasedExpertSublayer(config, moe, paper_block) for _ in range(sublayers)])

    def route(self, flat: torch.Tensor, token_ids: torch.Tensor, context_ids: Optional[torch.Tensor] = None):
        if self.stage != 2 or context_ids is None or self.distilled.context_free:
            return super().route(flat, token_ids)
        scores = self.distilled(context_ids)[:, -token_ids.shape[1]:]
        experts = routing.distilled_assignment(scores.reshape(-1, self.num_experts))
        weight = self.router.weight if self.router is not None else None
        state = {buffer.name: getattr(self, buffer.name) for buffer in self.algorithm.state_buffers}
        return self.algorithm.eval_routing(flat, weight, token_ids.reshape(-1), state, experts)

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor,
                context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        token_index, expert_index, gates = self.route(flat, token_ids, context_ids)
        out = torch.zeros_like(flat)
        for expert in expert_index.unique().tolist():
            pick = expert_index == expert
            rows = token_index[pick]
            delta = self.expert_delta(flat[rows], expert)
            out.index_add_(0, rows, delta * gates[pick].to(delta.dtype).unsqueeze(-1))
        return out.view_as(hidden)


class Layer(nn.Module):
    """One pre-norm encoder or decoder layer (``cross``); ``moe_position`` None, mlp, after, before."""

    def __init__(self, config: ExportedConfig, arch: Seq2SeqArch, cross: bool,
                 moe_position: Optional[str] = None, sublayers: int = 1):
        super().__init__()
        bias = arch.add_bias_linear
        self.moe_position = moe_position
        self.attn_norm = _norm(config, config.hidden_size)
        self.attn = Attention(config, bias, config.num_query_groups)
        if cross:
            self.cross_attn_norm = _norm(config, config.hidden_size)
            self.cross_attn = Attention(config, bias)
        self.mlp_norm = _norm(config, config.hidden_size)
        if moe_position != "mlp":
            self.mlp = MLP(config.hidden_size, config.ffn_hidden_size, activation_function(config), bias)
        self.moe = Seq2SeqMoE(config, config.moe, sublayers, moe_position != "mlp", bias) if moe_position else None

    def forward(self, x, token_ids, angles, self_mask, cache=None, cross=None, context_ids=None):
        """x ``[B, s, d]``; ``cache`` (decoder): this layer's LayerCache, extended by the new keys/values;
        ``cross``: (k, v, mask) of the memory."""
        if self.moe_position == "before":
            x = x + self.moe(x, token_ids, context_ids)
        h = self.attn_norm(x)
        k, v = self.attn.keys_values(h, angles)
        if cache is not None:
            k, v = cache.extend(k, v)
        x = x + self.attn.attend(self.attn.query(h, angles), k, v, self_mask)
        if cross is not None:
            x = x + self.cross_attn.attend(self.cross_attn.query(self.cross_attn_norm(x), None), *cross)
        if self.moe_position == "mlp":
            x = x + self.moe(self.mlp_norm(x), token_ids, context_ids)
        else:
            x = x + self.mlp(self.mlp_norm(x))
        if self.moe_position == "after":
            x = x + self.moe(x, token_ids, context_ids)
        return x


class LayerCache:
    """One decoder layer's self-attention keys/values so far: ``[N, G, t, hd]`` each."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


@dataclass
class DecoderState:
    """The decoder's state for N hypotheses: cross-attention keys/values and mask of the memory
    (computed once per sentence), the self-attention cache per layer, and the decoder input ids so
    far ``prefix [N, t]`` (positions continue at ``t``; context-dependent routers read them)."""

    cross: List[Tuple[torch.Tensor, torch.Tensor]]
    cross_mask: torch.Tensor  # [N, 1, 1, S] True = padded source position
    layers: List[LayerCache]
    prefix: torch.Tensor

    @property
    def length(self) -> int:
        return self.prefix.shape[1]

    def select(self, rows: torch.Tensor, same_sources: bool = False) -> "DecoderState":
        """Keep / repeat / reorder hypotheses: row i of the result is row ``rows[i]``.

        ``same_sources``: row i's source sentence is unchanged (beam search reordering within each
        sentence's beam), so the cross-attention keys/values are kept as they are, not copied.
        """
        def pick(t):
            return None if t is None else t.index_select(0, rows)

        layers = []
        for cache in self.layers:
            new = LayerCache()
            new.k, new.v = pick(cache.k), pick(cache.v)
            layers.append(new)
        if same_sources:
            return DecoderState(self.cross, self.cross_mask, layers, pick(self.prefix))
        return DecoderState([(pick(k), pick(v)) for k, v in self.cross], pick(self.cross_mask), layers,
                            pick(self.prefix))


class ExportedSeq2Seq(nn.Module):
    """The translation model (module docstring); ``eos`` is the decoder start and end id."""

    def __init__(self, config: ExportedConfig, arch: Seq2SeqArch):
        super().__init__()
        self.config, self.arch = config, arch
        placement = {p.layer: p for p in config.moe.layers} if config.moe else {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif config.position_embedding_type != "rope":
            raise ConfigError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        self.encoder = self._stack(config, arch, False, 0, arch.encoder_layers, placement)
        self.decoder = self._stack(config, arch, True, arch.encoder_layers, arch.decoder_layers, placement)
        self.lm_head = nn.Module()
        if config.tie_word_embeddings:
            self.lm_head.bias = nn.Parameter(torch.zeros(config.vocab_size))
        else:
            self.lm_head.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        eod = (config.tokenizer or {}).get("eod")
        self.eos = None if eod is None else int(eod)  # the decoder start and end id (tokenizer.eod)

    @staticmethod
    def _stack(config, arch, cross: bool, first: int, count: int, placement) -> nn.Module:
        stack = nn.Module()
        stack.layers = nn.ModuleList([
            Layer(config, arch, cross, placement[first + i].position if first + i in placement else None,
                  placement[first + i].sublayers if first + i in placement else 1) for i in range(count)])
        stack.final_norm = _norm(config, config.hidden_size)
        return stack

    @classmethod
    def from_pretrained(cls, export_dir, device="cpu", dtype: Optional[torch.dtype] = None) -> "ExportedSeq2Seq":
        """Load a translation export; tensors stay mapped from the file on CPU unless moved."""
        from stablemoe_megatron.export.safetensors_io import SafetensorsFile

        config, arch = read_seq2seq_config(export_dir)
        return cls.from_tensors(config, arch, SafetensorsFile(Path(export_dir) / WEIGHTS_FILE).tensors(), device, dtype)

    @classmethod
    def from_tensors(cls, config, arch, tensors: dict, device="cpu", dtype=None) -> "ExportedSeq2Seq":
        return materialize(lambda: cls(config, arch), tensors, device, dtype)

    def load_weights(self, tensors: dict) -> None:
        """Strict: the names must equal this model's parameter and buffer names, with their shapes."""
        load_weights_strictly(self, tensors, "the weights", "tensor", "the model's configuration")

    # -- pieces ------------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, offset: int):
        """(token + position embeddings ``[B, s, d]``, RoPE angles or None) of ids at positions offset.."""
        end = offset + ids.shape[1]
        x = self.embed_tokens(ids)
        if self.config.position_embedding_type == "rope":
            return x, rotary_tables(self.config, end, ids.device)[offset:]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"position {end - 1} exceeds the model's {self.config.max_position_embeddings} "
                             f"learned positions")
        return x + self.embed_positions.weight[offset:end], None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder output ``[N, s, d]`` -> ``[N, s, V]``: tied embedding + bias, or the untied head."""
        if self.config.tie_word_embeddings:
            return F.linear(hidden, self.embed_tokens.weight, self.lm_head.bias)
        return F.linear(hidden, self.lm_head.weight)

    # -- the interface of decoding -----------------------------------------------------------------
    def encode(self, source_ids: torch.Tensor, source_padding: torch.Tensor) -> torch.Tensor:
        """source_ids ``[B, S]``, source_padding ``[B, S]`` (True = pad) -> memory ``[B, S, d]``."""
        x, angles = self._embed(source_ids, 0)
        mask = source_padding.bool()[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, source_ids, angles, mask)
        return self.encoder.final_norm(x)

    def start(self, memory: torch.Tensor, source_padding: torch.Tensor) -> DecoderState:
        """A fresh decoder state: each layer's cross-attention keys/values of ``memory`` ``[N, S, d]``."""
        cross = [layer.cross_attn.keys_values(memory, None) for layer in self.decoder.layers]
        empty = torch.zeros(memory.shape[0], 0, dtype=torch.long, device=memory.device)
        return DecoderState(cross, source_padding.bool()[:, None, None, :],
                            [LayerCache() for _ in self.decoder.layers], empty)

    def step(self, state: DecoderState, input_ids: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` ``[N, s]`` (the next decoder inputs) after the cached prefix; logits ``[N, s, V]``.

        The new tokens' self-attention keys/values are appended to ``state``; the new query i
        (position t + i) sees the cached keys and new keys up to itself.
        """
        offset, new = state.length, input_ids.shape[1]
        x, angles = self._embed(input_ids, offset)
        state.prefix = torch.cat([state.prefix, input_ids], dim=1)
        mask = None
        if new > 1:
            mask = torch.ones(new, offset + new, dtype=torch.bool, device=x.device).triu(offset + 1)[None, None]
        for layer, cache, (k, v) in zip(self.decoder.layers, state.layers, state.cross):
            x = layer(x, input_ids, angles, mask, cache, (k, v, state.cross_mask), state.prefix)
        return self.logits(self.decoder.final_norm(x))

    def forward(self, source_ids: torch.Tensor, source_padding: torch.Tensor,
                target_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, T, V]`` of decoder inputs ``[B, T]`` (EOS y_1 .. y_{T-1})."""
        memory = self.encode(source_ids, source_padding)
        return self.step(self.start(memory, source_padding), target_input_ids)
