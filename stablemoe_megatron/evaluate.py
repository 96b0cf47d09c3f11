"""``stablemoe-eval``: loss and perplexity of a checkpoint, in the layout of the processes it runs on.

    stablemoe-eval --load runs/x/checkpoints [--eval-split test | --eval-data-path PREFIX] [--full-split]
    torchrun --nproc-per-node 2 -m stablemoe_megatron.evaluate --load runs/x/checkpoints \\
        [--tensor-model-parallel-size 2 --sequence-parallel ...]

The model comes from the checkpoint (its ``run_config.yaml``); only the parallel layout, data,
tokenizer files and batch settings can be given here. Layout: the flags given; with none, the
checkpoint's layout when it fits the number of processes, else plain data parallelism (TP = PP =
EP = 1). The checkpoint reshards on load, so any layout gives the same loss.

What is scored. By default the trainer's own evaluation: ``--eval-iters`` global batches of the
chosen split (the checkpoint's global batch size, so the same samples as the trainer's validation
or final test). ``--full-split`` scores every sample of the split once (complete global batches:
fewer than one global batch of samples at the end may be left out; the output says how many were
scored). The result is one JSON line on stdout (``--output FILE.json`` writes it to a file too);
evaluation never writes into the training run's metrics or TensorBoard files.

Routing: StableMoE checkpoints saved in stage 2 route with their frozen distilled router; a
checkpoint of a run configured with ``--moe-stage2-start-iter`` but saved earlier is evaluated as
saved (stage 1, backbone routing) unless ``--moe-eval-stage 2`` freezes its distilled router now.
Expert Choice uses its causal threshold routing in evaluation.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from stablemoe_megatron.entry import run_entry_point
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.runtime import is_first_rank

PROG = "stablemoe-eval"
EVAL_ONLY = ("eval_split", "eval_data_path", "moe_eval_stage", "full_split", "output")
_TRAINING_FIELDS = ("micro_batch_size", "global_batch_size", "eval_iters")


def _evaluation_field(section: str, name: str) -> bool:
    """The config fields a user may set at evaluation time (the rest is the checkpoint's)."""
    return (section in ("parallel", "data") or (section == "training" and name in _TRAINING_FIELDS)
            or (section == "checkpoint" and name == "load"))


def build_parser():
    from stablemoe_megatron.cli_args import build_parser as config_parser

    description = ("Loss and perplexity of a checkpoint. The model, data and batch settings default to the "
                   "checkpoint's run_config.yaml (the defaults printed below are the trainer's); the flags "
                   "below override them. Layout: the flags given, else the checkpoint's if it fits the "
                   "processes, else TP = PP = EP = 1.")
    parser = config_parser(PROG, description, include=_evaluation_field)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval-split", choices=("valid", "test"), default="valid",
                       help="which part of the checkpoint's data to score (default: valid)")
    group.add_argument("--eval-data-path", nargs="+", metavar="VALUE", default=None,
                       help="score this .bin/.idx dataset (prefix or weighted blend) instead of a split")
    group.add_argument("--moe-eval-stage", type=int, choices=(1, 2), default=None,
                       help="StableMoE: 2 routes with the frozen distilled router even if the checkpoint "
                            "is from stage 1 (default: the checkpoint's stage)")
    group.add_argument("--full-split", action="store_true", default=False,
                       help="score every sample of the split once instead of --eval-iters global batches")
    group.add_argument("--output", metavar="FILE.json", default=None,
                       help="also write the JSON result to this file (default: stdout only)")
    return parser


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from stablemoe_megatron.cli_args import config_from_yaml_text
    from stablemoe_megatron.parallel import quiet_megatron_warnings
    from stablemoe_megatron.checkpoint import CONFIG_FILE, resolve_load_dir
    from stablemoe_megatron.runtime import world_size_from_env

    quiet_megatron_warnings()
    args = vars(build_parser().parse_args(argv))
    extra = {name: args.pop(name) for name in EVAL_ONLY}
    if "checkpoint.load" not in args:
        raise ConfigError("--load is required: the checkpoint (run directory or iter_* directory) to evaluate")
    load_dir = resolve_load_dir(args["checkpoint.load"])
    config = config_from_yaml_text((load_dir / CONFIG_FILE).read_text())
    given = {dest: value for dest, value in args.items() if dest != "checkpoint.load"}
    for dest, value in given.items():
        section, name = dest.split(".", 1)
        setattr(getattr(config, section), name, value)
    world = world_size_from_env()
    note = choose_layout(config, world, explicit=any(d.startswith("parallel.") for d in given))
    _fit_batch(config, world, batch_given="training.global_batch_size" in given)
    if extra["eval_data_path"]:
        config.data.test_data_path = list(extra["eval_data_path"])
        extra["eval_split"] = "test"
    config.checkpoint.save = config.checkpoint.load = None
    config.logging.metrics_file = config.logging.tensorboard_dir = None  # never the training run's files
    config.logging.routing_probe_interval = None
    if note and is_first_rank():
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    result = evaluate_checkpoint(config, load_dir, extra["eval_split"], extra["moe_eval_stage"], extra["full_split"])
    if is_first_rank():
        text = json.dumps(result)
        print(text, flush=True)
        if extra["output"]:
            Path(extra["output"]).write_text(text + "\n")
    return result


def choose_layout(config, world: int, explicit: bool) -> Optional[str]:
    """Set ``config.parallel`` for ``world`` processes; return a note when the checkpoint's layout was replaced.

    Explicit flags win (unset sizes are 1; a bad combination is reported by the usual checks).
    Otherwise the checkpoint's layout is kept when it fits, else TP = PP = EP = 1.
    """
    p = config.parallel
    if explicit or config.fits_layout(world):
        return None
    saved = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size)
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = p.expert_model_parallel_size = 1
    p.expert_tensor_parallel_size = None
    p.sequence_parallel = False
    return (f"the checkpoint's layout (TP {saved[0]}, PP {saved[1]}, EP {saved[2]}) does not fit {world} "
            f"process(es): evaluating with TP 1, PP 1, EP 1 (the weights reshard on load)")


def _fit_batch(config, world: int, batch_given: bool) -> None:
    """Keep the checkpoint's global batch (the trainer's evaluation samples) when it divides evenly."""
    micro, dp = config.training.micro_batch_size, config.data_parallel_size(world)
    gbs = config.training.global_batch_size
    if batch_given or gbs is None or gbs % (micro * dp) == 0:
        return
    samples = config.training.eval_iters * gbs
    config.training.global_batch_size = micro * dp
    config.training.eval_iters = math.ceil(samples / (micro * dp))


def evaluate_checkpoint(config, load_dir, split: str, stage: Optional[int], full_split: bool = False) -> dict:
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model.config import is_encoder_decoder

    from stablemoe_megatron import data as data_lib
    from stablemoe_megatron.training.build import build, layout_of
    from stablemoe_megatron.training.checkpointing import load_checkpoint
    from stablemoe_megatron.runtime import world_size_from_env
    from stablemoe_megatron.training.step import evaluate

    world = world_size_from_env()
    trainer = build(config, "evaluate")
    saved = load_checkpoint(load_dir, trainer.ddp_model, layout=layout_of(config), load_optim=False)
    if saved.stage == 2 or stage == 2:
        trainer.model.enter_stage_two()
    if is_encoder_decoder(config):  # parallel text: --valid-data-path / --test-data-path pairs
        from stablemoe_megatron import parallel_text as data_lib

        datasets = data_lib.build_datasets(config, trainer.tokenizer.eod, 0)
    else:
        datasets = data_lib.build_datasets(config, trainer.tokenizer, world, require_train=False, full_eval=full_split)
    dataset = datasets[2] if split == "test" else datasets[1]
    if dataset is None:
        raise ConfigError(f"the {split} split is empty: check --split or pass --eval-data-path")
    micro, gbs = config.training.micro_batch_size, trainer.global_batch
    iterations = len(dataset) // gbs if full_split else config.training.eval_iters
    if iterations < 1:
        raise ConfigError(f"the {split} split holds {len(dataset)} samples, less than one global batch ({gbs}): "
                          f"lower --micro-batch-size / --global-batch-size")
    factory = lambda: data_lib.micro_batches(dataset, 0, micro, ps.get_data_parallel_rank(),  # noqa: E731
                                             ps.get_data_parallel_world_size(), config.data.num_workers)
    loss = evaluate(trainer.step_context(), factory, iterations)
    result = {"split": split, "loss": loss, "ppl": math.exp(min(loss, 50.0)), "iteration": saved.iteration,
              "stage": trainer.model.stage if config.moe.enabled else None, "samples": iterations * gbs,
              "tokens": iterations * gbs * config.model.tokens_per_sample, "checkpoint": str(load_dir)}
    if full_split:
        result["split_samples"] = len(dataset)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_entry_point(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
