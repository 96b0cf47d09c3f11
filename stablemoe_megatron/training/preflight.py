"""Every check of user input that needs no process group, run before any expensive work.

:func:`preflight` validates the config (flag values and their combinations), the data files (each
``.bin`` against its ``.idx``), the tokenizer, the token range of the data, the ``--save``
directory (no other run's checkpoints) and, when resuming, the checkpoint (its files against its
index, its model against the flags): a mistake costs seconds and prints one message.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

from stablemoe_megatron import data as data_lib
from stablemoe_megatron.cli_args import config_from_yaml_text
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.checkpoint import (
    CONFIG_FILE, STATE_FILE, TRACKER, complete_iterations, read_train_state, resolve_load_dir)
from stablemoe_megatron.training.save_dir import check_existing_work, resumes_from

# Settings that define the model's parameters (and the function they compute: ``activation``): a
# checkpoint only loads into the same values. A run_config.yaml without a key has its default.
SHAPE_FIELDS = {
    "model": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "normalization",
              "position_embedding_type", "untie_embeddings_and_output_weights", "activation"),
    "moe": ("num_experts", "router", "layer_positions", "layer_freq", "sublayers_per_expert",
            "expert_ffn_hidden_size", "distill_router", "distill_dim", "distill_layers"),
}


def check_checkpoint_compatible(config: RunConfig, saved: RunConfig, load_dir) -> None:
    """ConfigError naming every flag whose value differs from the checkpoint's model."""
    from stablemoe_megatron.cli_args import flag_name

    diffs = []
    for section, names in SHAPE_FIELDS.items():
        for name in names:
            now, then = getattr(getattr(config, section), name), getattr(getattr(saved, section), name)
            if section == "moe" and name == "distill_router":
                now, then = config.moe.effective_distill_router, saved.moe.effective_distill_router
            if now != then:
                diffs.append(f"{flag_name(section, name)} {now} (checkpoint: {then})")
    if diffs:
        raise ConfigError(f"--load {load_dir} holds a different model: " + "; ".join(diffs)
                          + ". Use the checkpoint's settings (see its run_config.yaml).")


class Checked(NamedTuple):
    """What :func:`preflight` found: the tokenizer, the padded vocabulary, the checkpoint to resume."""

    tokenizer: object
    vocab_size: int  # padded (Megatron's rule), the model's embedding rows
    load_dir: Optional[Path]  # the iter_* directory to resume from, None for a fresh start
    saved_state: object  # its TrainState, or None


def preflight(config: RunConfig, world_size: int, resume: bool = True) -> Checked:
    """All checks that need no process group (``resume=False``: ignore --load, as evaluation does)."""
    config.validate(world_size)
    data_lib.check_data_paths(config.data)
    tokenizer = data_lib.tokenizer_from_config(config.data)
    load_dir, saved_state = None, None
    ckpt = config.checkpoint
    if ckpt.save:
        check_existing_work(ckpt.save, ckpt.load, ckpt.start_fresh)
    fresh_here = ckpt.start_fresh and ckpt.save and resumes_from(ckpt.save, ckpt.load)
    if resume and ckpt.load and not fresh_here and _has_checkpoint(ckpt.load):
        load_dir = resolve_load_dir(ckpt.load)
        saved = config_from_yaml_text((load_dir / CONFIG_FILE).read_text())
        check_checkpoint_compatible(config, saved, load_dir)
        saved_state = read_train_state(load_dir)
        if saved_state.tokenizer_vocab_size and tokenizer.vocab_size > saved_state.tokenizer_vocab_size:
            raise ConfigError(
                f"the tokenizer (--tokenizer-model {config.data.tokenizer_model}) has {tokenizer.vocab_size} "
                f"tokens, more than the {saved_state.tokenizer_vocab_size} the checkpoint's model (--load "
                f"{ckpt.load}) was built for: use the tokenizer the model was trained with")
    vocab = config.model.padded_vocab_size(tokenizer.vocab_size, config.parallel.tensor_model_parallel_size)
    data_lib.check_token_range(config.data, tokenizer.vocab_size)
    return Checked(tokenizer, vocab, load_dir, saved_state)


def _has_checkpoint(load) -> bool:
    """--load of a directory without a checkpoint yet starts from scratch (Megatron-LM's behaviour,
    so recipes can pass --load and --save the same directory); a missing directory is an error.
    A directory with complete ``iter_*`` checkpoints but no tracker has a checkpoint (recovered)."""
    path = Path(load)
    if not path.is_dir():
        raise ConfigError(f"--load {load}: no such directory")
    return (path / TRACKER).is_file() or (path / STATE_FILE).is_file() or bool(complete_iterations(path))
