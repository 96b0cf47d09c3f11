"""Megatron-LM's view of a checkpoint: the ``common.pt`` fields its loader and tools read.

Megatron-LM's ``pretrain_gpt.py`` (``--ckpt-format torch_dist``) saves with megatron-core's
``dist_checkpointing``, whose ``common.pt`` holds the non-sharded entries of the state dict:
``args`` (Megatron-LM's argparse Namespace), ``iteration``, ``checkpoint_version`` (3.0), the LR
scheduler and the optimizer's non-tensor state. Its ``load_checkpoint`` and tools
(``load_args_from_checkpoint``, the converters) read those three fields.

This module maps a RunConfig onto the Megatron-LM-named args:

* :func:`megatron_args`: the Namespace written into our own ``common.pt`` (by
  :func:`add_megatron_fields`, called by :func:`~.format.write_iteration` inside the staged
  directory, so the atomic publish covers it), so Megatron-LM's tools can inspect our checkpoints.
* :func:`model_differences`: the flags whose value differs from a Megatron-LM checkpoint's model
  (its ``args``), for the check before starting from its weights.

Torch is imported only inside the function that rewrites ``common.pt``.
"""
from __future__ import annotations

import os
from argparse import Namespace
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import List, Optional

from stablemoe_megatron.config import RunConfig, flag_name

COMMON_FILE = "common.pt"  # megatron dist_checkpointing's file of the non-sharded entries
CHECKPOINT_VERSION = 3.0  # Megatron-LM's generate_state_dict writes 3.0

# Megatron-LM args that fix the model's parameters (or the function they compute), each also the
# name of our ModelConfig field, with Megatron-LM's default for a checkpoint whose args lack one;
# ``activation`` is ours (Megatron-LM selects GeLU unless --swiglu / --squared-relu).
MODEL_ARGS = {
    "num_layers": None, "hidden_size": None, "ffn_hidden_size": None, "num_attention_heads": None,
    "swiglu": False, "add_bias_linear": True, "position_embedding_type": "learned_absolute",
    "normalization": "LayerNorm", "untie_embeddings_and_output_weights": False,
    "max_position_embeddings": None, "activation": "gelu",
}
# Megatron-LM model features this trainer does not read: {arg: what it is}; on when set and not False.
UNSUPPORTED_ARGS = {
    "group_query_attention": "grouped-query attention, which this trainer does not build",
    "qk_layernorm": "query/key layer norms, which this trainer does not build",
    "squared_relu": "squared-ReLU MLPs, which this trainer does not build",
    "add_qkv_bias": "QKV biases without the other linear biases, which this trainer does not build",
    "apply_layernorm_1p": "1+gamma layer norms, which this trainer does not build",
    "num_experts": "a Megatron-LM MoE model, whose experts are not read here: start from a dense checkpoint "
                   "(with --moe-use-upcycling to grow experts from its MLPs)",
}


def model_args(config: RunConfig) -> dict:
    """{Megatron-LM arg name: value} of the settings that define this config's dense model."""
    m = config.model
    return {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_size,
        "num_attention_heads": m.num_attention_heads, "swiglu": m.swiglu, "add_bias_linear": m.add_bias_linear,
        "position_embedding_type": m.position_embedding_type, "normalization": m.normalization,
        "untie_embeddings_and_output_weights": m.untie_embeddings_and_output_weights,
        "max_position_embeddings": m.max_positions, "activation": m.activation,
    }


def model_differences(config: RunConfig, checkpoint_args) -> List[str]:
    """``"--flag ours (checkpoint: theirs)"`` for every model setting that differs from a
    Megatron-LM checkpoint's ``args``; a feature this trainer does not build is named too.

    An arg the checkpoint lacks counts as Megatron-LM's default (MODEL_ARGS), or is not compared
    when there is none (a size). The position-embedding table size is compared only when both
    models learn one (``learned_absolute``).
    """
    ours, diffs = model_args(config), []
    learned = ours["position_embedding_type"] == "learned_absolute"
    for name, default in MODEL_ARGS.items():
        theirs = getattr(checkpoint_args, name, default)
        if theirs is None or (name == "max_position_embeddings" and not learned):
            continue
        if theirs != ours[name]:
            diffs.append(f"{flag_name('model', name)} {ours[name]} (checkpoint: {theirs})")
    for name, what in UNSUPPORTED_ARGS.items():
        value = getattr(checkpoint_args, name, None)
        if name == "add_qkv_bias" and getattr(checkpoint_args, "add_bias_linear", True):
            continue  # QKV biases are part of the linear biases, compared above
        if value not in (None, False):
            diffs.append(f"--{name.replace('_', '-')} {value} in the checkpoint: {what}")
    return diffs


def megatron_args(config: RunConfig, padded_vocab_size: Optional[int], iteration: int,
                  consumed_train_samples: int = 0, layout: Optional[dict] = None) -> Namespace:
    """Megatron-LM's ``args`` for a checkpoint of ``config``: the model (:func:`model_args`), the
    vocabulary, the parallel layout, the MoE placement, the run's position and batch settings.

    ``moe_layer_freq`` is written as Megatron-LM's 0/1-per-layer list of the layers whose MLP is an
    MoE layer (the paper layout's MoE blocks have no Megatron-LM counterpart: all 0; our
    ``moe_layout`` says which). Values are plain Python types (``torch.load`` reads them back
    with megatron-core's safe globals, which include Namespace).
    """
    m, moe, p, t, d = config.model, config.moe, config.parallel, config.training, config.data
    layout = dict(layout or {})
    placement = moe.moe_placement(m.num_layers) if moe.enabled else {}
    args = dict(model_args(config))
    args.update(
        seq_length=m.seq_length, kv_channels=m.hidden_size // m.num_attention_heads,
        num_query_groups=m.num_attention_heads, group_query_attention=False, qk_layernorm=False,
        squared_relu=False, add_qkv_bias=False, apply_layernorm_1p=False,
        add_position_embedding=m.position_embedding_type == "learned_absolute",
        use_rotary_position_embeddings=m.position_embedding_type == "rope",
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by, padded_vocab_size=padded_vocab_size,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout, init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size, sequence_parallel=p.sequence_parallel,
        use_distributed_optimizer=p.use_distributed_optimizer, data_parallel_size=layout.get("dp"),
        num_experts=moe.num_experts,
        moe_layer_freq=[1 if placement.get(n) == "mlp" else 0 for n in range(1, m.num_layers + 1)]
        if moe.enabled else None,
        moe_layout=None if not moe.enabled else ("megatron" if moe.megatron_layout else "paper"),
        moe_router=moe.router if moe.enabled else None,
        moe_ffn_hidden_size=(moe.expert_ffn_hidden_size or m.ffn_size) if moe.enabled else None,
        moe_router_topk=moe.effective_router_topk if moe.enabled else None,
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, train_iters=t.train_iters,
        seed=t.seed, bf16=t.bf16, fp16=t.fp16, lr=config.optimizer.lr, min_lr=config.optimizer.min_lr,
        tokenizer_type=d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
        merge_file=d.merge_file, ckpt_format="torch_dist", iteration=iteration,
        consumed_train_samples=consumed_train_samples, consumed_valid_samples=0,
        no_save_optim=False, no_save_rng=False,
    )
    if layout.get("dp"):
        args["world_size"] = layout["dp"] * p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    return Namespace(**args)


def add_megatron_fields(directory, config_yaml: str, train_state) -> bool:
    """Put ``iteration``, ``checkpoint_version`` and ``args`` into ``directory/common.pt`` (rank 0).

    ``dist_checkpointing.save`` has written ``common.pt`` with the state dict's non-sharded
    entries; they are kept, these three are added (replacing the file atomically). A payload that
    wrote no ``common.pt`` (not a dist_checkpointing save) is left as it is: returns False.
    """
    path = Path(directory) / COMMON_FILE
    if not path.is_file():
        return False
    import torch

    from stablemoe_megatron.cli_args import config_from_yaml_text

    config = config_from_yaml_text(config_yaml)
    state = asdict(train_state) if is_dataclass(train_state) else dict(train_state)
    vocab = state.get("tokenizer_vocab_size") or 0
    layout = state.get("layout") or {}
    padded = config.model.padded_vocab_size(vocab, layout.get("tp") or config.parallel.tensor_model_parallel_size) \
        if vocab else None
    # our own file, written a moment ago by dist_checkpointing.save: any pickled entry is trusted
    common = torch.load(path, map_location="cpu", weights_only=False)
    common.update(iteration=int(state["iteration"]), checkpoint_version=CHECKPOINT_VERSION,
                  args=megatron_args(config, padded, int(state["iteration"]),
                                     int(state.get("consumed_train_samples", 0)), layout))
    tmp = path.with_name(COMMON_FILE + ".tmp")
    torch.save(common, tmp)
    os.replace(tmp, path)
    return True
