"""config.json of an exported model: everything needed to run it without Megatron or the RunConfig.

An export directory holds::

    model.safetensors   every tensor once, names in stablemoe_megatron.export.names
    config.json         this schema (format "stablemoe-megatron-export", version 1)
    tokenizer files     tokenizer.model | vocab.json + merges.txt | hf_tokenizer/

The architecture fields state megatron's choices explicitly (pre-norm, LayerNorm eps, the FFN
activation, no linear biases, learned positions or RoPE with its base) so the pure-torch model in
:mod:`stablemoe_megatron.export.model` computes the same function. ``run_config`` is the full
training configuration, used by ``convert_checkpoint import`` to rebuild the Megatron model.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from stablemoe_megatron.errors import ConfigError

FORMAT = "stablemoe-megatron-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class MoELayerPlacement:
    """One MoE layer: attached to 0-based transformer layer ``layer``.

    ``position``: ``mlp`` (Megatron layout: the layer's MLP), ``after`` / ``before`` (paper layout:
    a residual block of ``sublayers``-deep expert stacks run after / before the layer).
    """

    layer: int
    position: str
    sublayers: int


@dataclass
class MoEExport:
    """Routing of the exported model.

    ``routing_stage`` 2 means routing by the frozen distilled router's argmax (StableMoE stage 2,
    or any router after distil-and-freeze); 1 means the backbone router decides.
    """

    num_experts: int
    router: str
    routing_stage: int
    expert_ffn_hidden_size: int
    layers: List[MoELayerPlacement]
    distilled_router: Optional[dict] = None  # {"kind": wordemb|cnn|transformer, "dim": D}

    @classmethod
    def from_dict(cls, values: dict) -> "MoEExport":
        values = dict(values)
        values["layers"] = [MoELayerPlacement(**entry) for entry in values["layers"]]
        return cls(**values)


@dataclass
class ExportedConfig:
    vocab_size: int  # rows of the embedding (megatron's padded vocabulary)
    tokenizer_vocab_size: Optional[int]
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    max_position_embeddings: int
    position_embedding_type: str  # learned_absolute | rope
    normalization: str  # LayerNorm | RMSNorm
    layernorm_epsilon: float
    tie_word_embeddings: bool
    dtype: str
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    activation: str = "gelu"  # gelu (exact) | relu; exports made before the option lack it: gelu
    moe: Optional[MoEExport] = None
    tokenizer: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    run_config: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config.json") -> "ExportedConfig":
        if values.get("format") != FORMAT:
            raise ConfigError(f"{where}: not a {FORMAT} config (format {values.get('format')!r})")
        if values.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{where}: format version {values.get('format_version')} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if "encoder_decoder" in unknown:  # read by export/seq2seq.py, not by the GPT model
            raise ConfigError(f"{where}: a translation (encoder-decoder) export: translate with "
                              f"tools/translate.py --exported DIR (perplexity/generate are for GPT exports)")
        if unknown:
            raise ConfigError(f"{where}: unknown fields {', '.join(sorted(unknown))}")
        values = dict(values)
        if values.get("moe") is not None:
            values["moe"] = MoEExport.from_dict(values["moe"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @property
    def head_dim(self) -> int:
        return self.kv_channels


def read_config_values(export_dir) -> Tuple[Path, dict]:
    """(path, parsed JSON) of ``export_dir``'s config.json; ConfigError when missing or not JSON."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{export_dir}: no {CONFIG_FILE}; not an exported model directory "
                          f"(make one with: convert_checkpoint.py export CHECKPOINT OUT_DIR)")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def read_config(export_dir) -> ExportedConfig:
    path, values = read_config_values(export_dir)
    return ExportedConfig.from_dict(values, str(path))


def moe_export(run_config, stage: int, stacks: Optional[Sequence[Tuple[int, int]]] = None) -> Optional[MoEExport]:
    """The MoE section of config.json for a RunConfig: routing, and the placement of every MoE layer.

    ``stacks``: (first exported layer, layers) of each transformer stack, each placed by the run's
    MoE flags (default: one stack of ``--num-layers``; a translation model passes its encoder's and
    decoder's, so decoder layer i is exported as layer L_enc + i).
    """
    moe, model = run_config.moe, run_config.model
    if not moe.enabled:
        return None
    if moe.effective_router_topk != 1:
        raise ConfigError(f"this checkpoint routes top-{moe.effective_router_topk} (--moe-router-topk); the exported "
                          f"pure-torch model routes top-1 only: evaluate it with stablemoe-eval --load instead")
    layers = []
    for first, count in stacks or ((0, model.num_layers),):
        for number, where in sorted(moe.moe_placement(count).items()):
            layers.append(MoELayerPlacement(first + number - 1, where,
                                            moe.sublayers_per_moe_layer() if where != "mlp" else 1))
    distilled = moe.effective_distill_router
    return MoEExport(num_experts=moe.num_experts, router=moe.router, routing_stage=stage,
                     expert_ffn_hidden_size=moe.expert_ffn_hidden_size or model.ffn_size, layers=layers,
                     distilled_router={"kind": distilled, "dim": moe.distill_dim, "layers": moe.distill_layers}
                     if distilled else None)


def write_config(export_dir, config: ExportedConfig) -> None:
    (Path(export_dir) / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
