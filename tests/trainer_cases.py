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
        # the paper's values where Megatron-LM's defaults differ (dropout would make layouts differ)
        "--hidden-dropout": 0.0, "--attention-dropout": 0.0, "--disable-bias-linear": True,
        "--clip-grad": 0.1, "--adam-beta2": 0.98,
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


def _trained(config):
    """A Trainer built for ``config`` and run through its loop (no final evaluations), --save released."""
    from stablemoe_megatron.training.build import build
    from stablemoe_megatron.training.loop import train_loop
    from stablemoe_megatron.training.reporting import Reporter

    trainer = build(config, "train")
    try:
        train_loop(trainer, Reporter(None, None, config.training.train_iters))
    finally:
        trainer.release()
    return trainer


def train_and_inspect_frozen_router(argv):
    """Train through the switch; return this rank's view of the frozen distilled routers."""
    import torch

    from stablemoe_megatron.cli_args import parse_config
    config = parse_config(argv)
    trainer = _trained(config)
    params = [p for r in trainer.model.distilled_routers() for p in r.distilled.parameters()]
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    probe = torch.arange(trainer.tokenizer.vocab_size).view(1, -1)
    routes = [r.distilled.scores(probe).argmax(-1).squeeze(0) for r in trainer.model.distilled_routers()]
    return {
        "stage": trainer.state.stage,
        "params": [p.detach().clone() for p in params],
        "snapshot": [p.clone() for p in trainer.stage.frozen_snapshot],
        "requires_grad": [p.requires_grad for p in params],
        "in_megatron_optimizer": any(id(p) in in_optimizer for p in params),
        "side_optimizer": trainer.side_optimizer is not None,
        "tables": [r.expert_table.clone() for r in trainer.model.distilled_routers()],
        "routes": routes,
    }


def hash_tables_after_training(argv):
    """(the hash routers' tables, the table built independently from the data's token counts)."""
    from stablemoe_megatron import data as data_lib
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.routing import frequency_balanced_hash_table
    config = parse_config(argv)
    trainer = _trained(config)
    vocab = trainer.model.moe_layers[0].router.table.numel()
    expected = frequency_balanced_hash_table(data_lib.token_counts(config.data, vocab),
                                             config.moe.num_experts, config.moe.hash_seed)
    return [layer.router.table.clone() for layer in trainer.model.moe_layers], expected
