"""``convert_checkpoint inspect``: what a checkpoint holds, read from its metadata (no tensors loaded).

Reports the model settings, iteration, training stage, the parallel layout it was saved with, and
parameter counts by family (see :func:`stablemoe_megatron.export.names.category`): shared
(embeddings, attention, dense MLPs, norms), expert (the paper's "expert parameters"), backbone
router, distilled router, and non-trained routing buffers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from stablemoe_megatron.export import names
from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint


def describe(path) -> Dict[str, object]:
    """A JSON-able summary of checkpoint ``path`` (run directory or iter_* directory)."""
    ckpt = TorchDistCheckpoint(path)
    run, state = ckpt.config, ckpt.state
    heads = run.model.num_attention_heads
    translation = run.model.model_family == "encoder_decoder"
    if translation:  # megatron's T5Model keys: the translation export's names
        from stablemoe_megatron.export import seq2seq_export

        shapes = {}
        for key, info in ckpt.stored_tensors().items():
            if seq2seq_export.is_model_key(key):
                shapes.update(seq2seq_export._shapes(key, tuple(info.shape), heads, heads))
    else:
        shapes = names.exported_shapes({k: i.shape for k, i in ckpt.model_tensors().items()}, heads, heads)
    counts = names.parameter_counts(shapes)
    counts["total"] = sum(counts.values())
    dtypes = sorted({str(i.dtype).replace("torch.", "") for i in ckpt.model_tensors().values()}
                    or {str(i.dtype).replace("torch.", "") for i in ckpt.stored_tensors().values()})
    moe = run.moe
    return {
        "checkpoint": str(ckpt.directory),
        "iterations_in_run": ckpt.iterations(),
        "iteration": state.iteration,
        "consumed_train_samples": state.consumed_train_samples,
        "stage": state.stage,
        "layout": state.layout,
        "optimizer_state": ckpt.has_optimizer_state(),
        "model": {"model_family": run.model.model_family,
                  "num_layers": (f"{run.model.encoder_layers} encoder + {run.model.decoder_layers} decoder"
                                 if translation else run.model.num_layers), "hidden_size": run.model.hidden_size,
                  "ffn_hidden_size": run.model.ffn_size, "num_attention_heads": heads,
                  "seq_length": run.model.seq_length, "position_embedding_type": run.model.position_embedding_type,
                  "normalization": run.model.normalization,
                  "tied_embeddings": not run.model.untie_embeddings_and_output_weights,
                  "vocab_rows": shapes.get("embed_tokens.weight", (0,))[0],
                  "tokenizer_vocab_size": ckpt.tokenizer_vocab_size(), "dtypes": dtypes},
        "moe": None if not moe.enabled else {
            "num_experts": moe.num_experts, "router": moe.router,
            "layout": "megatron (MoE MLPs)" if moe.megatron_layout else f"paper ({moe.layer_positions})",
            "moe_layers": _moe_layers(run, translation),
            "sublayers_per_expert": moe.sublayers_per_moe_layer(),
            "distill_router": moe.effective_distill_router, "stage2_start_iter": moe.stage2_start_iter},
        "parameters": counts,
        "size_on_disk_bytes": sum(f.stat().st_size for f in Path(ckpt.directory).iterdir() if f.is_file()),
    }


def _moe_layers(run, translation: bool) -> Dict[str, str]:
    """{0-based exported layer: where}; a translation model's as "encoder.i" / "decoder.i"."""
    moe, model = run.moe, run.model
    if not translation:
        return {str(n - 1): where for n, where in sorted(moe.moe_placement(model.num_layers).items())}
    out = {}
    for stack, layers in (("encoder", model.encoder_layers), ("decoder", model.decoder_layers)):
        out.update({f"{stack}.{n - 1}": where for n, where in sorted(moe.moe_placement(layers).items())})
    return out


def _millions(value: int) -> str:
    return f"{value / 1e6:,.2f}M ({value:,})"


def format_summary(info: Dict[str, object]) -> str:
    """The summary as aligned text lines."""
    model, moe, params = info["model"], info["moe"], info["parameters"]
    lines = [
        f"checkpoint      {info['checkpoint']}",
        f"iteration       {info['iteration']} (stage {info['stage']}, {info['consumed_train_samples']:,} samples "
        f"consumed; saved iterations in this run: {info['iterations_in_run']})",
        f"saved layout    {info['layout']}",
        f"optimizer state {'yes' if info['optimizer_state'] else 'no (model only)'}",
        f"model           {model['num_layers']} layers, hidden {model['hidden_size']}, FFN {model['ffn_hidden_size']}, "
        f"{model['num_attention_heads']} heads, seq {model['seq_length']}, {model['position_embedding_type']}, "
        f"{model['normalization']}, {'tied' if model['tied_embeddings'] else 'untied'} embeddings, "
        f"vocab {model['vocab_rows']} rows (tokenizer {model['tokenizer_vocab_size']}), {'/'.join(model['dtypes'])}",
    ]
    if moe:
        lines.append(f"moe             {moe['num_experts']} experts, router {moe['router']}, {moe['layout']}, "
                     f"MoE layers at {moe['moe_layers']} (0-based, as the exported layers.i), "
                     f"{moe['sublayers_per_expert']} sublayer(s) per expert, "
                     f"distilled router {moe['distill_router']}, stage 2 from iteration {moe['stage2_start_iter']}")
    else:
        lines.append("moe             none (dense model)")
    for family in ("shared", "expert", "router", "distilled", "buffer", "total"):
        lines.append(f"params {family:<10}{_millions(params[family])}")
    lines.append(f"size on disk    {info['size_on_disk_bytes'] / 2**20:,.1f} MiB")
    return "\n".join(lines)
