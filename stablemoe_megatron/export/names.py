"""Tensor names of the exported model and how they map to megatron's checkpoint keys.

A torch_dist checkpoint stores every model tensor ONCE under a layout-independent global key
(megatron's ``ShardedTensor.key``: global layer numbers, the whole TP-unsplit tensor, experts
stacked along a leading axis of size N; in a dense model megatron also stacks the layers: one
``decoder.layers.<param>`` tensor with a leading axis of size L). The export renames those keys
(one rule each, below), unstacks layers and splits megatron's fused QKV weight into q/k/v;
nothing else changes, so converting back is the same rules read the other way.

Exported names (``i`` = 0-based transformer layer, ``k`` = expert sublayer, N experts, V padded
vocabulary, d hidden, F FFN size, P positions)::

    embed_tokens.weight                     [V, d]
    embed_positions.weight                  [P, d]      learned absolute positions only
    layers.i.attn_norm.{weight,bias}        [d]         pre-attention LayerNorm (no bias: RMSNorm)
    layers.i.attn.{q,k,v}_proj.weight       [d, d]      rows = heads x head_dim
    layers.i.attn.o_proj.weight             [d, d]
    layers.i.mlp_norm.{weight,bias}         [d]         pre-MLP norm (also of a Megatron-layout MoE layer)
    layers.i.mlp.fc1.weight, .fc2.weight    [F, d], [d, F]   (dense layers)
    layers.i.moe.router.weight              [N, d]      centroids E (stablemoe/base) or W (switch/expert-choice)
    layers.i.moe.distilled.*                            the distilled router's own torch names
                                                        (embedding.weight [V, D], centroids [N, D], ...)
    layers.i.moe.hash_table                 [V] int64   hash router
    layers.i.moe.thresholds(_initialized)   [N], []     expert-choice evaluation thresholds
    layers.i.moe.experts.k.fc1.weight       [N, F_e, d] sublayer k of every expert
    layers.i.moe.experts.k.fc2.weight       [N, d, F_e]
    layers.i.moe.experts.k.norm.{weight,bias} [N, d]    paper layout: per-expert pre-LayerNorm
    final_norm.{weight,bias}                [d]
    lm_head.weight                          [V, d]      only with untied embeddings

Layer ``i``'s MoE layer is either its MLP (Megatron layout) or a residual block run after /
before it (paper layout); config.json's ``moe.layers`` says which.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from stablemoe_megatron.errors import ConfigError

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_L = r"decoder\.layers\.(\d+)\."
_MOE = _L + r"(?:mlp|moe_block)\."

RULES: List[Tuple[re.Pattern, str]] = [(re.compile(p), t) for p, t in (
    (r"embedding\.word_embeddings\.weight", "embed_tokens.weight"),
    (r"embedding\.position_embeddings\.weight", "embed_positions.weight"),
    (r"decoder\.final_layernorm\.(weight|bias)", r"final_norm.\1"),
    (r"output_layer\.weight", "lm_head.weight"),
    (_L + r"(?:self_attention\.linear_qkv\.layer_norm_|input_layernorm\.)(weight|bias)", r"layers.\1.attn_norm.\2"),
    (_L + r"self_attention\.linear_proj\.weight", r"layers.\1.attn.o_proj.weight"),
    (_L + r"(?:mlp\.linear_fc1\.layer_norm_|pre_mlp_layernorm\.)(weight|bias)", r"layers.\1.mlp_norm.\2"),
    (_L + r"mlp\.linear_fc([12])\.weight", r"layers.\1.mlp.fc\2.weight"),
    (_MOE + r"router\.weight", r"layers.\1.moe.router.weight"),
    (_MOE + r"router\.distilled\.(.+)", r"layers.\1.moe.distilled.\2"),
    (_MOE + r"router\.table", r"layers.\1.moe.hash_table"),
    (_MOE + r"router\.(thresholds|thresholds_initialized)", r"layers.\1.moe.\2"),
    (_MOE + r"experts\.sublayers\.(\d+)\.experts\.linear_fc([12])\.weight", r"layers.\1.moe.experts.\2.fc\3.weight"),
    (_MOE + r"experts\.norms\.(\d+)\.experts\.norm\.(weight|bias)", r"layers.\1.moe.experts.\2.norm.\3"),
)]
QKV = re.compile(_L + r"self_attention\.linear_qkv\.weight")
# megatron stacks the layers of a homogeneous (dense) decoder into one tensor per parameter:
# key without a layer number, a leading axis of size num_layers.
STACKED = re.compile(r"decoder\.layers\.(?!\d+\.)(.+)")


def unstack(key: str, shape: Tuple[int, ...]) -> List[Tuple[str, Optional[int], Tuple[int, ...]]]:
    """[(per-layer key, layer index or None, per-layer shape)] of a (possibly stacked) megatron key."""
    match = STACKED.fullmatch(key)
    if match is None:
        return [(key, None, tuple(shape))]
    return [(f"decoder.layers.{i}.{match.group(1)}", i, tuple(shape[1:])) for i in range(shape[0])]


def is_model_key(key: str) -> bool:
    """True for the model's tensors in a checkpoint (not optimizer state, RNG, scheduler)."""
    return key.startswith(MODEL_PREFIXES) and "/shard_" not in key and not key.endswith("._extra_state")


def export_names(key: str) -> List[str]:
    """Exported name(s) of a megatron model key: three for the fused QKV weight, else one.

    Raises ConfigError for a model key no rule knows, so a tensor is never silently left out.
    """
    match = QKV.fullmatch(key)
    if match:
        layer = match.group(1)
        return [f"layers.{layer}.attn.{part}_proj.weight" for part in ("q", "k", "v")]
    for pattern, template in RULES:
        if pattern.fullmatch(key):
            return [pattern.sub(template, key)]
    raise ConfigError(f"checkpoint tensor {key!r} has no exported name: this converter does not know "
                      f"that part of the model (a newer model version?)")


def split_qkv(weight: torch.Tensor, heads: int, query_groups: int) -> List[torch.Tensor]:
    """megatron's fused QKV weight ``[(np + 2 ng) hn, d]`` -> q ``[np hn, d]``, k, v ``[ng hn, d]``.

    megatron interleaves by query group: for each group g the rows are its (np/ng) query heads,
    then its key head, then its value head (each hn rows).
    """
    rows, cols = weight.shape
    per_group = heads // query_groups
    head_dim = rows // (heads + 2 * query_groups)
    grouped = weight.view(query_groups, per_group + 2, head_dim, cols)
    q = grouped[:, :per_group].reshape(heads * head_dim, cols)
    k = grouped[:, per_group].reshape(query_groups * head_dim, cols)
    v = grouped[:, per_group + 1].reshape(query_groups * head_dim, cols)
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, query_groups: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    cols = q.shape[1]
    head_dim = q.shape[0] // heads
    per_group = heads // query_groups
    grouped = torch.cat([q.reshape(query_groups, per_group, head_dim, cols),
                         k.reshape(query_groups, 1, head_dim, cols),
                         v.reshape(query_groups, 1, head_dim, cols)], dim=1)
    return grouped.reshape(-1, cols)


def category(name: str) -> str:
    """Parameter family of an exported name, for parameter counts.

    ``expert`` (expert FFNs and their norms: the paper's "expert parameters"), ``router``
    (backbone routing weights), ``distilled`` (the distilled token-id router), ``buffer``
    (hash table, expert-choice thresholds: not trained), ``shared`` (everything else).
    """
    if ".moe.experts." in name:
        return "expert"
    if ".moe.distilled." in name:
        return "distilled"
    if ".moe.router." in name:
        return "router"
    if name.endswith((".moe.hash_table", ".moe.thresholds", ".moe.thresholds_initialized")):
        return "buffer"
    return "shared"


def parameter_counts(shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, int]:
    """{category: number of elements} over exported names -> shapes (see :func:`category`)."""
    counts = {"shared": 0, "expert": 0, "router": 0, "distilled": 0, "buffer": 0}
    for name, shape in shapes.items():
        numel = 1
        for size in shape:
            numel *= int(size)
        counts[category(name)] += numel
    return counts


def exported_shapes(key_shapes: Dict[str, Tuple[int, ...]], heads: int, query_groups: int) -> Dict[str, Tuple[int, ...]]:
    """{exported name: shape} from {megatron model key: global shape}."""
    out = {}
    for stored_key, stored_shape in key_shapes.items():
        for key, _, shape in unstack(stored_key, stored_shape):
            names = export_names(key)
            if len(names) == 3:
                head_dim = shape[0] // (heads + 2 * query_groups)
                rows = (heads * head_dim, query_groups * head_dim, query_groups * head_dim)
                out.update({n: (r, shape[1]) for n, r in zip(names, rows)})
            else:
                out[names[0]] = tuple(shape)
    return out


def exported_parts(key: str, tensor: torch.Tensor, heads: int, query_groups: int) -> Dict[str, torch.Tensor]:
    """{exported name: tensor} of one stored megatron tensor (unstacks layers, splits QKV)."""
    out = {}
    for layer_key, index, _ in unstack(key, tuple(tensor.shape)):
        value = tensor if index is None else tensor[index]
        names = export_names(layer_key)
        values = split_qkv(value, heads, query_groups) if len(names) == 3 else [value]
        out.update(zip(names, values))
    return out


def global_reader(read: Callable[[str], torch.Tensor], heads: int, query_groups: int,
                  num_layers: int) -> Callable[[str], torch.Tensor]:
    """A function megatron key -> global tensor, given ``read(exported name)`` (merges q/k/v, stacks layers)."""
    def read_layer_key(key: str) -> torch.Tensor:
        names = export_names(key)
        if len(names) == 3:
            return merge_qkv(*(read(n) for n in names), heads=heads, query_groups=query_groups)
        return read(names[0])

    def read_key(key: str) -> torch.Tensor:
        match = STACKED.fullmatch(key)
        if match is None:
            return read_layer_key(key)
        return torch.stack([read_layer_key(f"decoder.layers.{i}.{match.group(1)}") for i in range(num_layers)])
    return read_key
