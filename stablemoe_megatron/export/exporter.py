"""``convert_checkpoint export``: a torch_dist checkpoint -> one safetensors file + config.json + tokenizer.

Memory: the checkpoint is read one global tensor at a time (:mod:`.dist_reader`) and streamed into
the file (:mod:`.safetensors_io`), so exporting needs about the largest single tensor in memory
(plus the fused QKV weight of one layer), whatever the model size or training layout. The output
is written to ``OUT.tmp`` and renamed, so an interrupted export never leaves a half directory
under the final name.

Before writing, the planned tensors are checked against the pure-torch model built from the new
config.json (:class:`~stablemoe_megatron.export.model.ExportedGPT`, on the meta device): a tensor
the model does not expect, or one it needs and the checkpoint lacks, stops the export.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export import names
from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
from stablemoe_megatron.export.safetensors_io import SafetensorsWriter, storage_order
from stablemoe_megatron.export.schema import (
    WEIGHTS_FILE,
    ExportedConfig,
    moe_export,
    write_config,
)
from stablemoe_megatron.export.tokenizer_files import copy_tokenizer

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _megatron_defaults(run_config) -> dict:
    """Architecture constants from megatron's own TransformerConfig for this model.

    ``activation`` is the run's ``--activation``, checked against the function megatron applies,
    so config.json never names an activation the pure-torch model would compute differently.
    """
    from stablemoe_megatron.export.model import ACTIVATION_FUNCTIONS
    from stablemoe_megatron.model.gpt import transformer_config

    tconfig = transformer_config(run_config.model, run_config.moe)
    activation = run_config.model.activation
    if tconfig.activation_func is not ACTIVATION_FUNCTIONS.get(activation) or tconfig.gated_linear_unit \
            or tconfig.add_bias_linear or getattr(tconfig, "qk_layernorm", False):
        raise ConfigError("this model uses an architecture option the exporter does not implement "
                          "(an activation other than GeLU / ReLU, GLU, linear biases or QK layernorm)")
    return {"layernorm_epsilon": tconfig.layernorm_epsilon, "num_query_groups": tconfig.num_query_groups,
            "kv_channels": tconfig.kv_channels, "activation": activation}


def routing_stage(run_config, saved_stage: int, requested: Optional[int]) -> int:
    """Stage whose routing the export uses: the checkpoint's, or 2 when asked (distilled routing).

    A stage-1 checkpoint trained with ``--moe-eval-routing distilled`` is evaluated with its
    distilled router, so its export routes that way too.
    """
    moe = run_config.moe
    if requested is None:
        if not moe.effective_distill_router:
            return 1
        return 2 if moe.routes_distilled_in_evaluation else saved_stage
    if requested == 2 and not moe.effective_distill_router:
        raise ConfigError(f"--stage 2 needs a distilled router; this model (--moe-router {moe.router}) has none")
    if requested == 1 and saved_stage == 2:
        raise ConfigError("--stage 1: this checkpoint is in stage 2; its backbone router kept training "
                          "only through the gate, so stage-1 routing is not the model that was trained")
    return requested


def build_config(ckpt: TorchDistCheckpoint, vocab_rows: int, stage: int, dtype: str, tokenizer: dict) -> ExportedConfig:
    run, state = ckpt.config, ckpt.state
    return ExportedConfig(
        vocab_size=vocab_rows, tokenizer_vocab_size=tokenizer.get("vocab_size") or ckpt.tokenizer_vocab_size(),
        num_layers=run.model.num_layers, hidden_size=run.model.hidden_size, ffn_hidden_size=run.model.ffn_size,
        num_attention_heads=run.model.num_attention_heads, max_position_embeddings=run.model.max_positions,
        position_embedding_type=run.model.position_embedding_type, normalization=run.model.normalization,
        tie_word_embeddings=not run.model.untie_embeddings_and_output_weights, dtype=dtype,
        moe=moe_export(run, stage), tokenizer=tokenizer, run_config=run.to_dict(),
        source={"checkpoint": str(ckpt.directory), "iteration": state.iteration, "stage": state.stage,
                "consumed_train_samples": state.consumed_train_samples, "layout": state.layout},
        **_megatron_defaults(run))


Plan = List[Tuple[str, torch.dtype, Tuple[int, ...], str]]  # (exported name, dtype, shape, megatron key)


def plan_tensors(ckpt: TorchDistCheckpoint, heads: int, groups: int, dtype: Optional[torch.dtype]) -> Plan:
    """Every exported tensor with its source key, in file order (aligned; parts of one stored tensor adjacent)."""
    plan = []
    for key, info in ckpt.model_tensors().items():
        out_dtype = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        for name, shape in names.exported_shapes({key: info.shape}, heads, groups).items():
            plan.append((name, out_dtype, shape, key))
    order = storage_order([(n, d, s) for n, d, s, _ in plan])
    source = {n: k for n, _, _, k in plan}
    return [(n, d, s, source[n]) for n, d, s in order]


def check_against_model(config: ExportedConfig, plan: Plan) -> None:
    """ConfigError unless the planned names and shapes are exactly what the pure model loads."""
    from stablemoe_megatron.export.model import ExportedGPT

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ExportedGPT(config).state_dict().items()}
    planned = {name: tuple(shape) for name, _, shape, _ in plan}
    missing, extra = sorted(set(expected) - set(planned)), sorted(set(planned) - set(expected))
    wrong = sorted(n for n in set(expected) & set(planned) if expected[n] != planned[n])
    if missing or extra or wrong:
        raise ConfigError(f"the checkpoint does not match its run_config.yaml: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}, wrong shapes {wrong[:5]}")


def _write_weights(path: Path, ckpt: TorchDistCheckpoint, plan: Plan, heads: int, groups: int,
                   metadata: Dict[str, str]) -> None:
    writer = SafetensorsWriter(path, [(n, d, s) for n, d, s, _ in plan], metadata)
    pending: Dict[str, torch.Tensor] = {}  # parts of a stored tensor (q/k/v, stacked layers) not yet written
    try:
        for name, dtype, _, key in plan:
            if name not in pending:
                pending.update(names.exported_parts(key, ckpt.read(key), heads, groups))
            writer.write(name, pending.pop(name).to(dtype))
        writer.close()
    except BaseException:
        writer.abort()
        raise


def export_checkpoint(src, out_dir, *, stage: Optional[int] = None, dtype: Optional[str] = None,
                      tokenizer_files: Optional[dict] = None, overwrite: bool = False,
                      log: Callable[[str], None] = print) -> ExportedConfig:
    """Export checkpoint ``src`` (run dir or iter dir) to directory ``out_dir``; return its config."""
    ckpt = TorchDistCheckpoint(src)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; choose a new directory or pass --overwrite")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
    stage_used = routing_stage(ckpt.config, ckpt.state.stage, stage)
    if ckpt.config.model.model_family == "encoder_decoder":  # a translation model: its own names and config.json
        from stablemoe_megatron.export.seq2seq_export import export_encoder_decoder

        return export_encoder_decoder(ckpt, out, stage_used, dtype, DTYPE_NAMES.get(dtype), tokenizer_files or {}, log)
    vocab_rows = ckpt.model_tensors()["embedding.word_embeddings.weight"].shape[0]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = copy_tokenizer(ckpt.config.data, tmp, tokenizer_files or {}, vocab_rows)
        stored = {str(i.dtype).replace("torch.", "") for i in ckpt.model_tensors().values() if i.dtype.is_floating_point}
        config = build_config(ckpt, vocab_rows, stage_used, dtype or "/".join(sorted(stored)), tokenizer)
        heads, groups = config.num_attention_heads, config.num_query_groups
        plan = plan_tensors(ckpt, heads, groups, DTYPE_NAMES.get(dtype))
        check_against_model(config, plan)
        log(f"exporting {len(plan)} tensors of {ckpt.directory} (iteration {ckpt.state.iteration}, "
            f"stage {ckpt.state.stage}, routing stage {stage_used}) to {out}")
        _write_weights(tmp / WEIGHTS_FILE, ckpt, plan, heads, groups,
                       {"format": "pt", "source": str(ckpt.directory), "iteration": str(ckpt.state.iteration)})
        write_config(tmp, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return config
