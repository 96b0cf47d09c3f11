"""Translation (encoder-decoder) checkpoints -> the pure-torch model or an export directory.

``convert_checkpoint export`` calls :func:`export_encoder_decoder` for a checkpoint whose
run_config.yaml says ``model.model_family: encoder_decoder``: it writes ``model.safetensors`` (names
of :mod:`stablemoe_megatron.export.seq2seq`), ``config.json`` (:class:`ExportedConfig` plus the
``encoder_decoder`` section) and the tokenizer files, streaming one checkpoint tensor at a time, to
``OUT.tmp`` renamed at the end. :func:`model_from_checkpoint` builds the same model straight from the
checkpoint, without writing anything.

megatron's keys (T5Model, local or transformer-engine spec) map one rule each; the fused
self-attention QKV weight and bias are split per query group (:func:`names.split_qkv`), the
cross-attention ``linear_kv`` per head into its key and value halves (megatron's CrossAttention
views its output as ``[heads, 2 * head_dim]``). T5Model stores two aliases of tensors it holds
twice (``position_embeddings.*`` = ``embedding.position_embeddings.*``, ``lm_head.output_layer.*`` =
``output_layer.*``); they are skipped. Dense stacks stored stacked (``encoder.layers.<param>``
with a leading layer axis) are unstacked. Any other key without a rule stops the conversion.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
from stablemoe_megatron.export.names import split_qkv
from stablemoe_megatron.export.safetensors_io import SafetensorsWriter, storage_order
from stablemoe_megatron.export.schema import WEIGHTS_FILE, ExportedConfig, moe_export
from stablemoe_megatron.export.seq2seq import ExportedSeq2Seq, Seq2SeqArch, write_seq2seq_config
from stablemoe_megatron.export.tokenizer_files import copy_tokenizer, load_tokenizer

FAMILY = "encoder_decoder"
_S = r"(encoder|decoder)\.layers\.(\d+)\."
_MOE = _S + r"(?:mlp|moe_block)\."
RULES = [(re.compile(p), t) for p, t in (
    (r"embedding\.word_embeddings\.weight", "embed_tokens.weight"),
    (r"embedding\.position_embeddings\.weight", "embed_positions.weight"),
    (r"(encoder|decoder)\.final_layernorm\.(weight|bias)", r"\1.final_norm.\2"),
    (r"output_layer\.(weight|bias)", r"lm_head.\1"),
    (_S + r"(?:self_attention\.linear_qkv\.layer_norm_|input_layernorm\.)(weight|bias)", r"\1.layers.\2.attn_norm.\3"),
    (_S + r"self_attention\.linear_proj\.(weight|bias)", r"\1.layers.\2.attn.o_proj.\3"),
    (_S + r"pre_cross_attn_layernorm\.(weight|bias)", r"\1.layers.\2.cross_attn_norm.\3"),
    (_S + r"cross_attention\.linear_q\.(weight|bias)", r"\1.layers.\2.cross_attn.q_proj.\3"),
    (_S + r"cross_attention\.linear_proj\.(weight|bias)", r"\1.layers.\2.cross_attn.o_proj.\3"),
    (_S + r"(?:mlp\.linear_fc1\.layer_norm_|pre_mlp_layernorm\.)(weight|bias)", r"\1.layers.\2.mlp_norm.\3"),
    (_S + r"mlp\.linear_fc([12])\.(weight|bias)", r"\1.layers.\2.mlp.fc\3.\4"),
    (_MOE + r"router\.weight", r"\1.layers.\2.moe.router.weight"),
    (_MOE + r"router\.distilled\.(.+)", r"\1.layers.\2.moe.distilled.\3"),
    (_MOE + r"router\.table", r"\1.layers.\2.moe.hash_table"),
    (_MOE + r"router\.(thresholds|thresholds_initialized)", r"\1.layers.\2.moe.\3"),
    (_MOE + r"experts\.sublayers\.(\d+)\.experts\.linear_fc([12])\.(weight|bias)",
     r"\1.layers.\2.moe.experts.\3.fc\4.\5"),
    (_MOE + r"experts\.norms\.(\d+)\.experts\.norm\.(weight|bias)", r"\1.layers.\2.moe.experts.\3.norm.\4"),
)]
QKV = re.compile(_S + r"self_attention\.linear_qkv\.(weight|bias)")
CROSS_KV = re.compile(_S + r"cross_attention\.linear_kv\.(weight|bias)")
STACKED = re.compile(r"(encoder|decoder)\.layers\.(?!\d+\.)(.+)")
MODEL_PREFIXES = ("embedding.", "encoder.", "decoder.", "output_layer.")


def is_model_key(key: str) -> bool:
    """A tensor of the model: not optimizer state, not transformer-engine extra state, and not one of
    T5Model's aliases (``position_embeddings.*``, ``lm_head.output_layer.*``: other prefixes)."""
    return key.startswith(MODEL_PREFIXES) and "/shard_" not in key and not key.endswith("._extra_state")


def unstack(key: str, shape: Tuple[int, ...]) -> List[Tuple[str, Optional[int], Tuple[int, ...]]]:
    """[(per-layer key, layer index or None, per-layer shape)] of a (possibly stacked) key."""
    match = STACKED.fullmatch(key)
    if match is None:
        return [(key, None, tuple(shape))]
    stack, rest = match.groups()
    return [(f"{stack}.layers.{i}.{rest}", i, tuple(shape[1:])) for i in range(shape[0])]


def export_names(key: str) -> List[str]:
    """Exported name(s) of a per-layer megatron key: 3 for fused QKV, 2 for cross-attention KV."""
    for pattern, parts in ((QKV, ("q", "k", "v")), (CROSS_KV, ("k", "v"))):
        match = pattern.fullmatch(key)
        if match:
            stack, layer, kind = match.groups()
            block = "attn" if pattern is QKV else "cross_attn"
            return [f"{stack}.layers.{layer}.{block}.{p}_proj.{kind}" for p in parts]
    for pattern, template in RULES:
        if pattern.fullmatch(key):
            return [pattern.sub(template, key)]
    raise ConfigError(f"checkpoint tensor {key!r} has no exported name: this converter does not know "
                      f"that part of the translation model (a newer model version?)")


def split_kv(tensor: torch.Tensor, heads: int) -> List[torch.Tensor]:
    """megatron's cross-attention ``linear_kv`` weight ``[heads * 2 * hd, d]`` (or its bias) -> k, v
    ``[heads * hd, ...]``: megatron views the output as ``[heads, 2 * hd]`` and halves the last axis."""
    grouped = tensor.reshape(heads, 2, tensor.shape[0] // (2 * heads), *tensor.shape[1:])
    return [grouped[:, i].reshape(-1, *tensor.shape[1:]).contiguous() for i in (0, 1)]


def _split(value: torch.Tensor, count: int, heads: int, groups: int) -> List[torch.Tensor]:
    """The exported parts of one per-layer tensor: itself, cross-attention k/v, or self-attention q/k/v."""
    if count == 1:
        return [value]
    if count == 2:
        return split_kv(value, heads)
    column = value.unsqueeze(-1) if value.dim() == 1 else value  # a bias splits like a weight's rows
    return [part.squeeze(-1) if value.dim() == 1 else part for part in split_qkv(column, heads, groups)]


def _shapes(key: str, shape: Tuple[int, ...], heads: int, groups: int) -> Dict[str, Tuple[int, ...]]:
    out = {}
    for layer_key, _, layer_shape in unstack(key, shape):
        names = export_names(layer_key)
        if len(names) == 1:
            out[names[0]] = layer_shape
            continue
        per_head = layer_shape[0] // (heads + 2 * groups) if len(names) == 3 else layer_shape[0] // (2 * heads)
        rows = (heads * per_head, groups * per_head, groups * per_head) if len(names) == 3 else (heads * per_head,) * 2
        out.update({n: (r, *layer_shape[1:]) for n, r in zip(names, rows)})
    return out


def exported_parts(key: str, tensor: torch.Tensor, heads: int, groups: int) -> Dict[str, torch.Tensor]:
    """{exported name: tensor} of one stored megatron tensor (unstacks layers, splits QKV / KV)."""
    out = {}
    for layer_key, index, _ in unstack(key, tuple(tensor.shape)):
        value = tensor if index is None else tensor[index]
        names = export_names(layer_key)
        out.update(zip(names, _split(value, len(names), heads, groups)))
    return out


# -- config.json -----------------------------------------------------------------------------------
def architecture(run) -> dict:
    """ExportedConfig's architecture constants from megatron's own TransformerConfig of this run.

    Linear biases are supported here (translation runs keep megatron's default); GLU (SwiGLU) and
    QK layernorm are not, nor an activation the pure model would compute differently.
    """
    from stablemoe_megatron.export.model import ACTIVATION_FUNCTIONS
    from stablemoe_megatron.model.gpt import transformer_config

    tconfig = transformer_config(run.model, run.moe)
    activation = run.model.activation
    if tconfig.activation_func is not ACTIVATION_FUNCTIONS.get(activation) or tconfig.gated_linear_unit \
            or getattr(tconfig, "qk_layernorm", False):
        raise ConfigError("this model uses an architecture option the translation exporter does not implement "
                          "(an activation other than GeLU / ReLU, GLU (--swiglu) or QK layernorm)")
    return {"layernorm_epsilon": tconfig.layernorm_epsilon, "num_query_groups": tconfig.num_query_groups,
            "kv_channels": tconfig.kv_channels, "activation": activation}


def build_config(ckpt: TorchDistCheckpoint, vocab_rows: int, stage: int, dtype: str,
                 tokenizer: dict) -> Tuple[ExportedConfig, Seq2SeqArch]:
    run, state = ckpt.config, ckpt.state
    model = run.model
    config = ExportedConfig(
        vocab_size=vocab_rows, tokenizer_vocab_size=tokenizer.get("vocab_size") or ckpt.tokenizer_vocab_size(),
        num_layers=model.encoder_layers + model.decoder_layers, hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_size, num_attention_heads=model.num_attention_heads,
        max_position_embeddings=model.max_positions, position_embedding_type=model.position_embedding_type,
        normalization=model.normalization, tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        dtype=dtype, rotary_base=10000.0, rotary_percent=1.0,  # T5Model's RotaryEmbedding defaults
        moe=moe_export(run, stage, stacks=((0, run.model.encoder_layers),
                                                 (run.model.encoder_layers, run.model.decoder_layers))), tokenizer=tokenizer, run_config=run.to_dict(),
        source={"checkpoint": str(ckpt.directory), "iteration": state.iteration, "stage": state.stage,
                "consumed_train_samples": state.consumed_train_samples, "layout": state.layout},
        **architecture(run))
    arch = Seq2SeqArch(encoder_layers=model.encoder_layers, decoder_layers=model.decoder_layers,
                       add_bias_linear=bool(model.add_bias_linear), source_length=int(model.source_length),
                       target_length=int(model.target_length))
    return config, arch


def open_checkpoint(path, flag: str = "--checkpoint") -> TorchDistCheckpoint:
    """The checkpoint at ``path``; ConfigError (naming ``flag``) unless it is a translation model's."""
    if not Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: no such checkpoint directory")
    ckpt = TorchDistCheckpoint(path)
    family = getattr(ckpt.config.model, "model_family", "gpt")
    if family != FAMILY:
        raise ConfigError(f"{flag} {path}: a {family} checkpoint (run_config.yaml model.model_family: {family}); "
                          f"translation needs a --model-family {FAMILY} model (for a language model use "
                          f"stablemoe-eval or convert_checkpoint perplexity/generate)")
    return ckpt


Plan = List[Tuple[str, torch.dtype, Tuple[int, ...], str]]  # (exported name, dtype, shape, megatron key)


def plan_tensors(ckpt: TorchDistCheckpoint, heads: int, groups: int, dtype: Optional[torch.dtype]) -> Plan:
    """Every exported tensor with its source key, in file order (parts of one stored tensor adjacent)."""
    plan = []
    for key, info in ckpt.stored_tensors().items():
        if not is_model_key(key):
            continue
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        plan.extend((name, out_dtype, shape, key) for name, shape in _shapes(key, info.shape, heads, groups).items())
    order = storage_order([(n, d, s) for n, d, s, _ in plan])
    source = {n: k for n, _, _, k in plan}
    return [(n, d, s, source[n]) for n, d, s in order]


def check_against_model(config: ExportedConfig, arch: Seq2SeqArch, plan: Plan) -> None:
    """ConfigError unless the planned names and shapes are exactly what the pure model loads."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ExportedSeq2Seq(config, arch).state_dict().items()}
    planned = {name: tuple(shape) for name, _, shape, _ in plan}
    missing, extra = sorted(set(expected) - set(planned)), sorted(set(planned) - set(expected))
    wrong = sorted(n for n in set(expected) & set(planned) if expected[n] != planned[n])
    if missing or extra or wrong:
        raise ConfigError(f"the checkpoint does not match its run_config.yaml: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")


def _stored_dtypes(ckpt: TorchDistCheckpoint) -> str:
    """config.json's ``dtype`` of the weights as stored, e.g. ``float32`` or ``bfloat16/float32``."""
    return "/".join(sorted({str(info.dtype).replace("torch.", "") for key, info in ckpt.stored_tensors().items()
                            if is_model_key(key) and info.dtype.is_floating_point}))


def model_from_checkpoint(ckpt: TorchDistCheckpoint, stage: int, tokenizer_files: Optional[dict] = None,
                          dtype: Optional[torch.dtype] = None):
    """(ExportedSeq2Seq of ``ckpt`` with routing ``stage``, its tokenizer), read straight from the
    checkpoint (the tokenizer files are copied to a temporary directory to be checked and loaded)."""
    import tempfile

    vocab_rows = ckpt.model_tensors()["embedding.word_embeddings.weight"].shape[0]
    with tempfile.TemporaryDirectory() as folder:
        entry = copy_tokenizer(ckpt.config.data, folder, tokenizer_files or {}, vocab_rows)
        tokenizer = load_tokenizer(folder, entry)
    config, arch = build_config(ckpt, vocab_rows, stage, _stored_dtypes(ckpt), entry)
    plan = plan_tensors(ckpt, config.num_attention_heads, config.num_query_groups, None)
    check_against_model(config, arch, plan)
    tensors: Dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(key for _, _, _, key in plan):
        tensors.update(exported_parts(key, ckpt.read(key), config.num_attention_heads, config.num_query_groups))
    return ExportedSeq2Seq.from_tensors(config, arch, tensors, dtype=dtype), tokenizer


def export_encoder_decoder(ckpt: TorchDistCheckpoint, out, stage: int, dtype: Optional[str],
                           dtype_of: Optional[torch.dtype], tokenizer_files: dict,
                           log: Callable[[str], None] = print) -> ExportedConfig:
    """Write the export directory ``out`` of a translation checkpoint (module docstring); return its config.

    Called by :func:`stablemoe_megatron.export.exporter.export_checkpoint` after its checks
    (``out`` may exist only with ``--overwrite``; ``stage`` is resolved, ``dtype`` checked).
    """
    out = Path(out)
    vocab_rows = ckpt.model_tensors()["embedding.word_embeddings.weight"].shape[0]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = copy_tokenizer(ckpt.config.data, tmp, tokenizer_files, vocab_rows)
        config, arch = build_config(ckpt, vocab_rows, stage, dtype or _stored_dtypes(ckpt), tokenizer)
        heads, groups = config.num_attention_heads, config.num_query_groups
        plan = plan_tensors(ckpt, heads, groups, dtype_of)
        check_against_model(config, arch, plan)
        log(f"exporting {len(plan)} tensors of the translation model {ckpt.directory} (iteration "
            f"{ckpt.state.iteration}, stage {ckpt.state.stage}, routing stage {stage}) to {out}")
        _write(tmp / WEIGHTS_FILE, ckpt, plan, heads, groups,
               {"format": "pt", "source": str(ckpt.directory), "iteration": str(ckpt.state.iteration)})
        write_seq2seq_config(tmp, config, arch)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return config


def _write(path: Path, ckpt: TorchDistCheckpoint, plan: Plan, heads: int, groups: int, metadata: dict) -> None:
    writer = SafetensorsWriter(path, [(n, d, s) for n, d, s, _ in plan], metadata)
    pending: Dict[str, torch.Tensor] = {}  # parts of a stored tensor (q/k/v, stacked layers) not yet written
    try:
        for name, dtype, _, key in plan:
            if name not in pending:
                pending.update(exported_parts(key, ckpt.read(key), heads, groups))
            writer.write(name, pending.pop(name).to(dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise
