"""A small pure-torch GPT that runs an exported model: logits, loss, greedy decoding. No Megatron.

    model = ExportedGPT.from_pretrained("exported/")       # weights mapped from model.safetensors
    logits = model(token_ids)                              # [B, S] -> [B, S, V]

It computes the function of megatron-core's GPTModel as this project builds it: token (+ learned
position) embeddings; per layer ``x += Attn(Norm(x))`` (causal, softmax scale 1/sqrt(head_dim),
optional RoPE) and ``x += MLP(Norm(x))`` (fc1, the activation of config.json ``activation``: exact
GeLU or ReLU, fc2, no biases); a final norm; logits
against the (tied) embedding. MoE layers use the evaluation-time routing of the trainer: the
``eval_routing`` of the router's registered algorithm (:mod:`stablemoe_megatron.routing.registry`):

* stablemoe / base: s = E h, expert argmax s (stage 1) or the distilled router's argmax (stage
  2), gate sigmoid(s[expert]);  switch: softmax(W h), top-1 (or distilled in stage 2), gate = its
  probability;  hash: table[token id], gate 1;  expert-choice: every expert whose probability
  reaches its threshold (causal), gate = the probability.
* Megatron layout: the layer's MLP is ``g * FFN_e(Norm(x))``; paper layout: a residual block
  ``h + g * (z_K - h)``, ``z_k = z_{k-1} + FFN_{e,k}(LN_{e,k}(z_{k-1}))``, after/before the layer.

The routing functions are the trainer's own (:mod:`stablemoe_megatron.routing`, pure torch), so
both sides route identically. Module names equal the exported tensor names, so loading is a
strict ``load_state_dict``: a missing or extra tensor is an error.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from stablemoe_megatron import routing
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.schema import WEIGHTS_FILE, ExportedConfig, MoEExport, read_config


ACTIVATION_FUNCTIONS = {"gelu": F.gelu, "relu": F.relu}  # megatron's activation_func of each


def activation_function(config: ExportedConfig):
    """The FFN activation of the backbone MLPs and expert sublayers (``--activation`` of the run).

    The same torch functions megatron applies (``F.gelu`` is exact, not the tanh approximation),
    so both models compute the same function.
    """
    try:
        return ACTIVATION_FUNCTIONS[config.activation]
    except KeyError:
        raise ConfigError(f"config.json: activation {config.activation!r} is not supported "
                          f"(known: {', '.join(ACTIVATION_FUNCTIONS)})") from None


def _norm(config: ExportedConfig, size: int) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(size, eps=config.layernorm_epsilon)


def rotary_tables(config: ExportedConfig, seq_len: int, device) -> torch.Tensor:
    """megatron's RotaryEmbedding angles ``[S, rot_dim]`` (non-interleaved halves)."""
    dim = int(config.kv_channels * config.rotary_percent)
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x ``[B, S, H, hd]``; rotate the first ``rot_dim`` features (megatron's rotate-half form)."""
    rot_dim = angles.shape[-1]
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    angles = angles[None, :, None, :].to(x.dtype)
    return torch.cat((rot * angles.cos() + rotated * angles.sin(), rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ExportedConfig):
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, angles: Optional[torch.Tensor]) -> torch.Tensor:
        """x ``[B, S, d]`` -> ``[B, S, d]`` (causal)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.groups, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.groups, self.head_dim)
        if angles is not None:
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=2)
            v = v.repeat_interleave(self.heads // self.groups, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    """Dense FFN ``fc2(act(fc1(x)))``, no biases; ``activation`` defaults to exact GeLU."""

    def __init__(self, hidden: int, ffn: int, activation=F.gelu):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, bias=False)
        self.fc2 = nn.Linear(ffn, hidden, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _Weight(nn.Module):
    """A module holding one parameter named ``weight`` (so exported names end in ``.weight``)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class ExpertNorms(nn.Module):
    """One LayerNorm/RMSNorm per expert: weight (and bias) ``[N, d]``."""

    def __init__(self, config: ExportedConfig, num_experts: int):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = config.layernorm_epsilon
        self.weight = nn.Parameter(torch.ones(num_experts, config.hidden_size))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight[expert], self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight[expert], self.bias[expert], self.eps)


class ExpertSublayer(nn.Module):
    """Sublayer k of every expert: fc1 ``[N, F, d]``, fc2 ``[N, d, F]``, optional per-expert norm."""

    def __init__(self, config: ExportedConfig, moe: MoEExport, with_norm: bool):
        super().__init__()
        n, d, f = moe.num_experts, config.hidden_size, moe.expert_ffn_hidden_size
        self.fc1 = _Weight(n, f, d)
        self.fc2 = _Weight(n, d, f)
        self.norm = ExpertNorms(config, n) if with_norm else None
        self.activation = activation_function(config)

    def ffn(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(self.activation(F.linear(x, self.fc1.weight[expert])), self.fc2.weight[expert])


_BUFFER_DTYPES = {"long": torch.long, "float": None, "bool": torch.bool}  # None: the default float dtype


class MoE(nn.Module):
    """One MoE layer (evaluation routing, see the module doc); returns only the added term.

    Its tensors follow the router's algorithm: ``router.weight`` [N, d] when it is learned, its
    ``state_buffers`` (hash table [V], Expert Choice thresholds [N] ...), the distilled router.
    """

    def __init__(self, config: ExportedConfig, moe: MoEExport, sublayers: int, paper_block: bool):
        super().__init__()
        self.algorithm = routing.get_routing(moe.router)
        self.num_experts, self.stage = moe.num_experts, moe.routing_stage
        self.paper_block = paper_block
        self.router = _Weight(moe.num_experts, config.hidden_size) if self.algorithm.learned else None
        sizes = {"vocab": (config.vocab_size,), "experts": (moe.num_experts,), "scalar": ()}
        for buffer in self.algorithm.state_buffers:
            self.register_buffer(buffer.name, torch.zeros(sizes[buffer.size], dtype=_BUFFER_DTYPES[buffer.dtype]))
        self.distilled = None
        if moe.distilled_router is not None:
            from stablemoe_megatron.routing.distilled import build_distilled_router

            spec = moe.distilled_router
            options = {"num_layers": spec.get("layers", 1)} if spec["kind"] != "wordemb" else {}
            self.distilled = build_distilled_router(spec["kind"], config.vocab_size, moe.num_experts,
                                                    spec["dim"], **options)
        self.experts = nn.ModuleList([ExpertSublayer(config, moe, paper_block) for _ in range(sublayers)])

    def route(self, flat: torch.Tensor, token_ids: torch.Tensor):
        """(token_index [A], expert_index [A], gates [A]) for flat hidden ``[T, d]``, ids ``[B, S]``.

        The algorithm's evaluation routing; in stage 2 the distilled router's argmax [T] chooses
        the experts and the algorithm supplies the gates.
        """
        experts = None
        if self.stage == 2:
            experts = routing.distilled_assignment(self.distilled(token_ids).reshape(-1, self.num_experts))
        weight = self.router.weight if self.router is not None else None
        state = {buffer.name: getattr(self, buffer.name) for buffer in self.algorithm.state_buffers}
        return self.algorithm.eval_routing(flat, weight, token_ids.reshape(-1), state, experts)

    def expert_delta(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """z_K - x of expert ``expert`` (paper block) or FFN_e(x) (Megatron layout)."""
        if not self.paper_block:
            return self.experts[0].ffn(x, expert)
        state = x
        for sublayer in self.experts:
            state = state + sublayer.ffn(sublayer.norm(state, expert), expert)
        return state - x

    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """hidden ``[B, S, d]`` -> ``sum over chosen experts of g * delta``, ``[B, S, d]``."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        token_index, expert_index, gates = self.route(flat, token_ids)
        out = torch.zeros_like(flat)
        for expert in expert_index.unique().tolist():
            pick = expert_index == expert
            rows = token_index[pick]
            delta = self.expert_delta(flat[rows], expert)
            out.index_add_(0, rows, delta * gates[pick].to(delta.dtype).unsqueeze(-1))
        return out.view_as(hidden)


class Layer(nn.Module):
    """Pre-norm transformer layer; ``moe_position``: None, "mlp", "after" or "before"."""

    def __init__(self, config: ExportedConfig, moe_position: Optional[str] = None, sublayers: int = 1):
        super().__init__()
        self.moe_position = moe_position
        self.attn_norm = _norm(config, config.hidden_size)
        self.attn = Attention(config)
        self.mlp_norm = _norm(config, config.hidden_size)
        if moe_position != "mlp":
            self.mlp = MLP(config.hidden_size, config.ffn_hidden_size, activation_function(config))
        self.moe = MoE(config, config.moe, sublayers, moe_position != "mlp") if moe_position else None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, angles) -> torch.Tensor:
        if self.moe_position == "before":
            x = x + self.moe(x, token_ids)
        x = x + self.attn(self.attn_norm(x), angles)
        if self.moe_position == "mlp":
            x = x + self.moe(self.mlp_norm(x), token_ids)
        else:
            x = x + self.mlp(self.mlp_norm(x))
        if self.moe_position == "after":
            x = x + self.moe(x, token_ids)
        return x


def load_weights_strictly(module: nn.Module, tensors: dict, weights: str = "exported weights",
                          tensor: str = "exported tensor", config: str = "config.json") -> None:
    """Load ``tensors`` into ``module`` by assignment (no copy); their names must equal the module's
    parameter and buffer names and their shapes its shapes, else a ConfigError naming them (the
    nouns ``weights`` / ``tensor`` / ``config`` say where they came from)."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ConfigError(f"{weights} do not match {config}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ConfigError(f"{tensor} {name} has shape {tuple(value.shape)}, {config} implies "
                              f"{tuple(own[name].shape)}")
    module.load_state_dict(tensors, strict=True, assign=True)


def materialize(build, tensors: dict, device="cpu", dtype: Optional[torch.dtype] = None):
    """``build()`` on the meta device (no memory), its weights assigned from ``tensors``
    (:meth:`load_weights`), in evaluation mode, cast to ``dtype`` and moved to ``device``."""
    with torch.device("meta"):
        model = build()
    model.load_weights(tensors)
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


class ExportedGPT(nn.Module):
    """The exported model. ``forward(token_ids [B, S]) -> logits [B, S, V]`` (V = padded vocab)."""

    def __init__(self, config: ExportedConfig):
        super().__init__()
        self.config = config
        placement = {p.layer: p for p in config.moe.layers} if config.moe else {}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        elif config.position_embedding_type != "rope":
            raise ConfigError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        self.layers = nn.ModuleList([
            Layer(config, placement[i].position if i in placement else None,
                  placement[i].sublayers if i in placement else 1) for i in range(config.num_layers)])
        self.final_norm = _norm(config, config.hidden_size)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, export_dir, device="cpu", dtype: Optional[torch.dtype] = None) -> "ExportedGPT":
        """Load ``export_dir``; tensors stay mapped from the file on CPU (no copy) unless moved."""
        from stablemoe_megatron.export.safetensors_io import SafetensorsFile

        config = read_config(export_dir)
        return materialize(lambda: cls(config), SafetensorsFile(Path(export_dir) / WEIGHTS_FILE).tensors(),
                           device, dtype)

    def load_weights(self, tensors: dict) -> None:
        """Strict: the exported names must equal this model's parameter and buffer names."""
        load_weights_strictly(self, tensors)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        seq = token_ids.shape[1]
        x = self.embed_tokens(token_ids)
        angles = None
        if self.config.position_embedding_type == "learned_absolute":
            if seq > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {seq} exceeds max_position_embeddings "
                                 f"{self.config.max_position_embeddings}")
            x = x + self.embed_positions.weight[:seq]
        else:
            angles = rotary_tables(self.config, seq, token_ids.device)
        for layer in self.layers:
            x = layer(x, token_ids, angles)
        x = self.final_norm(x)
        head = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, head)

    def loss(self, token_ids: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None):
        """Mean next-token cross-entropy (fp32) over the unmasked positions, as the trainer computes it."""
        losses = F.cross_entropy(self(token_ids).float().flatten(0, 1), labels.reshape(-1), reduction="none")
        mask = torch.ones_like(losses) if loss_mask is None else loss_mask.reshape(-1).float()
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)
