"""Every check of user input that needs no process group, run before any expensive work.

:func:`preflight` validates the config (flag values and their combinations), the data files (each
``.bin`` against its ``.idx``), the tokenizer, the token range of the data, the ``--save``
directory (no other run's checkpoints) and, when resuming or starting from another checkpoint's
weights (``--pretrained-checkpoint``, ``--load --finetune``: :mod:`.pretrained`), the checkpoint
(its files against its index, its model against the flags): a mistake costs seconds and prints
one message.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

from stablemoe_megatron import data as data_lib, parallel_text
from stablemoe_megatron.cli_args import config_from_yaml_text
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.model.config import is_encoder_decoder
from stablemoe_megatron.checkpoint import (
    CONFIG_FILE, STATE_FILE, TRACKER, complete_iterations, read_train_state, resolve_load_dir)
from stablemoe_megatron.checkpoint.megatron_lm import COMMON_FILE, model_differences
from stablemoe_megatron.training.pretrained import WeightsSource, find_weights_source, megatron_lm_directory
from stablemoe_megatron.training.save_dir import check_existing_work, resumes_from

# Settings that define the model's parameters (and the function they compute: ``activation``): a
# checkpoint only loads into the same values. A run_config.yaml without a key has its default.
SHAPE_FIELDS = {
    "model": ("model_family", "num_layers", "encoder_num_layers", "decoder_num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "normalization",
              "position_embedding_type", "untie_embeddings_and_output_weights", "activation", "swiglu",
              "add_bias_linear"),
    "moe": ("num_experts", "router", "layer_positions", "layer_freq", "sublayers_per_expert",
            "expert_ffn_hidden_size", "distill_router", "distill_dim", "distill_layers"),
}


def check_checkpoint_compatible(config: RunConfig, saved: RunConfig, load_dir, what: Optional[str] = None,
                                sections=tuple(SHAPE_FIELDS)) -> None:
    """ConfigError naming every flag whose value differs from the checkpoint's model (``what``
    names the checkpoint in the message, default ``--load DIR``; ``sections`` of SHAPE_FIELDS)."""
    from stablemoe_megatron.cli_args import flag_name

    diffs = []
    for section in sections:
        for name in SHAPE_FIELDS[section]:
            now, then = getattr(getattr(config, section), name), getattr(getattr(saved, section), name)
            if section == "moe" and name == "distill_router":
                now, then = config.moe.effective_distill_router, saved.moe.effective_distill_router
            elif section == "moe" and name == "layer_freq" and now is not None and then is not None:
                now, then = _moe_layers(config), _moe_layers(saved)  # equal placements, any spelling
            elif section == "model" and name == "ffn_hidden_size":
                now, then = config.model.ffn_size, saved.model.ffn_size  # the default spelled out is the same
            if now != then:
                diffs.append(_bias_difference(now, then) if name == "add_bias_linear"
                             else f"{flag_name(section, name)} {now} (checkpoint: {then})")
    if diffs:
        raise ConfigError(f"{what or f'--load {load_dir}'} holds a different model: " + "; ".join(diffs)
                          + ". Use the checkpoint's settings (see its run_config.yaml).")


def _bias_difference(now: bool, then: bool) -> str:
    word = {True: "on", False: "off"}
    return (f"linear biases {word[now]} (checkpoint: {word[then]}; "
            f"{'add' if then is False else 'drop'} --disable-bias-linear)")


def _moe_layers(config: RunConfig) -> str:
    """The MoE layers of --moe-layer-freq as 'layers 1,3', whatever its spelling (int or pattern)."""
    from stablemoe_megatron.moe.config import layer_pattern

    try:
        pattern = layer_pattern(config.moe.layer_freq, config.model.num_layers)
    except ConfigError:
        return str(config.moe.layer_freq)
    return "layers " + ",".join(str(i + 1) for i, on in enumerate(pattern) if on)


class Checked(NamedTuple):
    """What :func:`preflight` found: the tokenizer, the padded vocabulary, the checkpoint to resume."""

    tokenizer: object
    vocab_size: int  # padded (Megatron's rule), the model's embedding rows
    load_dir: Optional[Path]  # the iter_* directory to resume from, None for a fresh start
    saved_state: object  # its TrainState, or None
    weights: Optional[WeightsSource] = None  # start from its weights at iteration 0 (--pretrained-checkpoint, --finetune)


def preflight(config: RunConfig, world_size: int, resume: bool = True) -> Checked:
    """All checks that need no process group (``resume=False``: ignore --load, as evaluation does)."""
    config.validate(world_size)
    config.model.recompute_kwargs(config.parallel.pipeline_model_parallel_size)  # the --recompute-* flags
    if is_encoder_decoder(config):
        parallel_text.check_parallel_data(config.data)
    else:
        data_lib.check_data_paths(config.data)
    tokenizer = data_lib.tokenizer_from_config(config.data)
    load_dir, saved_state = None, None
    ckpt = config.checkpoint
    if ckpt.save:
        check_existing_work(ckpt.save, ckpt.load, ckpt.start_fresh)
    fresh_here = ckpt.start_fresh and ckpt.save and resumes_from(ckpt.save, ckpt.load)
    weights = _weights_source(config, bool(fresh_here)) if resume else None
    if resume and weights is None and ckpt.load and not fresh_here and _has_checkpoint(ckpt.load):
        load_dir = _resume_dir(ckpt.load)
        saved = config_from_yaml_text((load_dir / CONFIG_FILE).read_text())
        check_checkpoint_compatible(config, saved, load_dir)
        saved_state = read_train_state(load_dir)
        _check_tokenizer_fits(config, tokenizer, saved_state.tokenizer_vocab_size, f"--load {ckpt.load}")
    if weights is not None:
        check_weights_source(config, weights, tokenizer)
    vocab = config.model.padded_vocab_size(tokenizer.vocab_size, config.parallel.tensor_model_parallel_size)
    (parallel_text if is_encoder_decoder(config) else data_lib).check_token_range(config.data, tokenizer.vocab_size)
    return Checked(tokenizer, vocab, load_dir, saved_state, weights)


def _check_tokenizer_fits(config: RunConfig, tokenizer, rows: Optional[int], source: str) -> None:
    """The tokenizer's ids must have rows in the checkpoint's embedding (``rows``: 0/None unknown)."""
    if rows and tokenizer.vocab_size > rows:
        raise ConfigError(
            f"the tokenizer ({data_lib.tokenizer_flags(config.data)}) has {tokenizer.vocab_size} "
            f"tokens, more than the {rows} the checkpoint's model ({source}) was built for: use the "
            f"tokenizer the model was trained with")


def _resume_dir(load) -> Path:
    """The iter_* directory a resume reads; a Megatron-LM checkpoint is refused with the way to use it."""
    if megatron_lm_directory(load) is not None:
        raise ConfigError(f"--load {load} holds a Megatron-LM checkpoint (no {STATE_FILE}): a resume needs this "
                          f"trainer's data position and optimizer layout; start from its weights at iteration 0 "
                          f"with --finetune, or pass it as --pretrained-checkpoint {load}")
    return resolve_load_dir(load)


def _weights_source(config: RunConfig, fresh_here: bool) -> Optional[WeightsSource]:
    """The checkpoint whose weights start the run (Megatron-LM's semantics, see :mod:`.pretrained`),
    or None: a resume from --load, or a fresh start."""
    ckpt, moe = config.checkpoint, config.moe
    if moe.use_upcycling and not moe.enabled:
        raise ConfigError("--moe-use-upcycling grows experts from a dense model's MLPs: add --num-experts")
    if ckpt.finetune and not ckpt.load:
        raise ConfigError("--finetune loads the weights of --load: add --load DIR (or start from a checkpoint's "
                          "weights with --pretrained-checkpoint DIR)")
    has = bool(ckpt.load) and not fresh_here and _has_checkpoint(ckpt.load, missing_ok=bool(ckpt.pretrained_checkpoint))
    if has and ckpt.finetune:
        if ckpt.save and resumes_from(ckpt.save, ckpt.load):
            raise ConfigError(f"--finetune restarts at iteration 0, but --save {ckpt.save} is the --load directory "
                              f"and holds its checkpoints: save the fine-tuned run elsewhere (--save NEW), or use "
                              f"--pretrained-checkpoint {ckpt.load} --load NEW --save NEW (a restart then resumes "
                              f"from NEW)")
        return find_weights_source(ckpt.load, f"--load {ckpt.load} --finetune")
    if has:
        return None
    if ckpt.finetune:
        raise ConfigError(f"--finetune: --load {ckpt.load} holds no checkpoint to start from")
    if ckpt.pretrained_checkpoint:
        return find_weights_source(ckpt.pretrained_checkpoint, f"--pretrained-checkpoint {ckpt.pretrained_checkpoint}")
    if moe.use_upcycling:
        raise ConfigError("--moe-use-upcycling grows the experts from a dense checkpoint's MLPs: give that "
                          "checkpoint with --pretrained-checkpoint DIR (or --load DIR --finetune)")
    return None


def check_weights_source(config: RunConfig, source: WeightsSource, tokenizer) -> None:
    """ConfigError when the source's model does not fit this run's flags: our checkpoint against
    its run_config.yaml (the MoE settings only if it has experts), Megatron-LM's against its args."""
    moe = config.moe
    if source.ours:
        saved = config_from_yaml_text((source.directory / CONFIG_FILE).read_text())
        if saved.moe.enabled and moe.use_upcycling:
            raise ConfigError(f"--moe-use-upcycling grows experts from a dense model, but {source.flag} holds an "
                              f"MoE model (--num-experts {saved.moe.num_experts}): drop --moe-use-upcycling")
        check_checkpoint_compatible(config, saved, source.directory, what=source.flag,
                                    sections=("model", "moe") if saved.moe.enabled else ("model",))
        rows = read_train_state(source.directory).tokenizer_vocab_size
    else:
        diffs = model_differences(config, source.args) if source.args is not None else []
        if diffs:
            raise ConfigError(f"{source.flag} holds a different model: " + "; ".join(diffs)
                              + f". Use the checkpoint's settings (its {COMMON_FILE} args).")
        rows = getattr(source.args, "padded_vocab_size", None)
    _check_tokenizer_fits(config, tokenizer, rows, source.flag)
    expert_ffn = moe.expert_ffn_hidden_size
    if moe.use_upcycling and expert_ffn not in (None, config.model.ffn_size):
        raise ConfigError(f"--moe-use-upcycling copies the dense MLP (--ffn-hidden-size {config.model.ffn_size}) "
                          f"into every expert: --moe-expert-ffn-hidden-size {expert_ffn} must equal it (or be unset)")


def _has_checkpoint(load, missing_ok: bool = False) -> bool:
    """--load of a directory without a checkpoint yet starts from scratch (Megatron-LM's behaviour,
    so recipes can pass --load and --save the same directory); a missing directory is an error
    (``missing_ok``, with --pretrained-checkpoint: no checkpoint yet). A directory with complete
    ``iter_*`` checkpoints but no tracker has a checkpoint (recovered)."""
    path = Path(load)
    if not path.is_dir() and missing_ok:
        return False
    if not path.is_dir():
        raise ConfigError(f"--load {load}: no such directory")
    return (path / TRACKER).is_file() or (path / STATE_FILE).is_file() or bool(complete_iterations(path))
