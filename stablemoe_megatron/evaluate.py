"""``stablemoe-eval``: loss and perplexity of a checkpoint, in any parallel layout.

    torchrun --nproc-per-node 2 -m stablemoe_megatron.evaluate --load runs/x/checkpoints \\
        [--eval-split test | --eval-data-path PREFIX] [--tensor-model-parallel-size 2 ...]

The model settings come from the checkpoint's ``run_config.yaml``; flags given here override the
parallel layout, data and evaluation settings. StableMoE checkpoints saved in stage 2 route with
their frozen distilled router (the routing the model will always use at inference); a checkpoint
of a run configured with ``--moe-stage2-start-iter`` but saved earlier is evaluated as saved
(stage 1, backbone routing) unless ``--moe-eval-stage 2`` freezes its distilled router now.
Expert Choice uses its causal threshold routing in evaluation.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.entry import run_entry_point


def _extra_args(argv):
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--eval-split", choices=("valid", "test"), default="valid")
    parser.add_argument("--eval-data-path", nargs="+", default=None,
                        help="evaluate this .bin/.idx dataset (prefix or blend) instead of a split")
    parser.add_argument("--moe-eval-stage", type=int, choices=(1, 2), default=None)
    return parser.parse_known_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from stablemoe_megatron.cli_args import config_from_yaml_text, parse_config
    from stablemoe_megatron.parallel import quiet_megatron_warnings

    quiet_megatron_warnings()
    extra, rest = _extra_args(argv)
    given = parse_config(rest, prog="stablemoe-eval")
    if not given.checkpoint.load:
        raise ConfigError("--load is required: the checkpoint (run directory or iter_* directory) to evaluate")
    from stablemoe_megatron.training.checkpointing import CONFIG_FILE, resolve_load_dir

    load_dir = resolve_load_dir(given.checkpoint.load)
    config = config_from_yaml_text((load_dir / CONFIG_FILE).read_text())
    _apply_overrides(config, given, rest)
    if extra.eval_data_path:
        config.data.test_data_path = list(extra.eval_data_path)
        extra.eval_split = "test"
    config.checkpoint.save = None
    return evaluate_checkpoint(config, load_dir, extra.eval_split, extra.moe_eval_stage)


def _apply_overrides(config, given, argv) -> None:
    """Copy the sections a user may change at evaluation time from the flags actually given."""
    from stablemoe_megatron.cli_args import build_parser

    explicit = vars(build_parser().parse_known_args(argv)[0])
    explicit.pop("config", None)
    for dest in explicit:
        section, name = dest.split(".", 1)
        if section in ("model", "moe") and name not in ("expert_choice_threshold_momentum",):
            continue  # the checkpoint defines the model
        setattr(getattr(config, section), name, getattr(getattr(given, section), name))


def evaluate_checkpoint(config, load_dir, split: str, stage: Optional[int]) -> dict:
    from megatron.core import parallel_state as ps

    from stablemoe_megatron import data as data_lib
    from stablemoe_megatron.training.checkpointing import load_checkpoint
    from stablemoe_megatron.training.loop import evaluate
    from stablemoe_megatron.training.reporting import Reporter
    from stablemoe_megatron.training.setup import (
        Job, initialize_and_build, layout_of, preflight, world_size_from_env)

    world = world_size_from_env()
    config.checkpoint.load = None  # preflight's compatibility check is not needed: same config
    tokenizer, vocab, _, _ = preflight(config, world)
    model, ddp, optimizer, scheduler, _ = initialize_and_build(config, vocab, world)
    saved = load_checkpoint(load_dir, ddp, layout=layout_of(config), load_optim=False)
    if saved.stage == 2 or stage == 2:
        model.enter_stage_two()
    train, valid, test = data_lib.build_datasets(config, tokenizer, world, require_train=False)
    dataset = test if split == "test" else valid
    if dataset is None:
        raise ConfigError(f"the {split} split is empty: check --split or pass --eval-data-path")
    micro = config.training.micro_batch_size
    job = Job(config, model, ddp, optimizer, scheduler, None, saved, tokenizer,
              config.num_microbatches(world), config.global_batch(world), None)
    factory = lambda: data_lib.micro_batches(dataset, 0, micro, ps.get_data_parallel_rank(),  # noqa: E731
                                             ps.get_data_parallel_world_size(), config.data.num_workers)
    loss = evaluate(job, factory, config.training.eval_iters)
    reporter = Reporter(None, config.logging.metrics_file, config.training.train_iters)
    reporter.validation(split, saved.iteration, loss)
    reporter.close()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "iteration": saved.iteration,
            "stage": model.moe_stage if config.moe.enabled else None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point("stablemoe-eval", run, argv)


if __name__ == "__main__":
    sys.exit(main())
