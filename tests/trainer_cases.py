"""Tiny trainer runs inside the multi-rank test workers (module-level, importable by name)."""
import json
from pathlib import Path


def tiny_flags(data: dict, **overrides) -> list:
    """Flags of a tiny StableMoE run on the test dataset; ``overrides`` replace or add flags."""
    flags = {
        "--num-layers": 2, "--hidden-size": 32, "--num-attention-heads": 4, "--seq-length": 32,
        "--micro-batch-size": 4, "--global-batch-size": 8, "--train-iters": 20, "--lr": 3e-3,
        "--lr-warmup-iters": 2, "--num-experts": 4, "--moe-router": "stablemoe",
        "--moe-sublayers-per-expert": 1, "--moe-stage2-start-iter": 8,
        "--data-path": data["prefix"], "--split": "90,10,0", "--tokenizer-model": data["tokenizer_model"],
        "--log-interval": 1, "--eval-interval": 1000, "--eval-iters": 1, "--seed": 7,
    }
    flags.update({k: v for k, v in overrides.items() if v is not None})
    argv = []
    for key, value in flags.items():
        if value is False:
            continue
        argv.append(key)
        if value is not True:
            argv.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else argv.append(str(value))
    return argv


def train(argv):
    """Run the trainer in this worker; return (results, per-iteration records) on the last rank."""
    import torch

    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.loop import pretrain

    config = parse_config(argv)
    results = pretrain(config)
    records = []
    metrics = config.logging.metrics_file
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    if metrics and last and Path(metrics).exists():
        records = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    return results, records


def losses_by_iteration(records) -> dict:
    return {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}
