"""Helpers of the checkpoint-conversion tests (module-level, so the multi-rank workers can run them).

No tests here. ``megatron_logits`` and ``random_checkpoint`` run inside ``run_distributed``
workers (process group and parallel_state already set up).
"""
import json
from pathlib import Path

import torch

IDS_SEED = 11


def token_batch(vocab: int = 500, batch: int = 3, seq: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(IDS_SEED)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    model.eval()
    with torch.no_grad():
        return model(ids, position_ids, None).float()


def megatron_logits(checkpoint: str, ids: torch.Tensor, stage2: bool = False) -> torch.Tensor:
    """Logits [B, S, V] of the Megatron model of ``checkpoint`` (world 1), as stablemoe-eval routes."""
    from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.training.checkpointing import load_checkpoint

    ckpt = TorchDistCheckpoint(checkpoint)
    config = ckpt.config
    rows = ckpt.model_tensors()["embedding.word_embeddings.weight"].shape[0]
    model = build_model(config.model, config.moe, rows, transformer_config(config.model, config.moe))
    saved = load_checkpoint(ckpt.directory, model, layout={"world": "this test"}, load_optim=False)  # model only
    if saved.stage == 2 or stage2:
        model.enter_stage_two()
    return _forward(model, ids)


def random_checkpoint(argv, out_dir: str, ids: torch.Tensor, stage: int = 1) -> torch.Tensor:
    """Save a freshly initialised model of ``argv`` as a model-only checkpoint; return its logits.

    Expert-choice thresholds are set to spread values so threshold routing is exercised.
    """
    from megatron.core import dist_checkpointing

    from stablemoe_megatron.cli_args import dump_config, parse_config
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.checkpoint import CONFIG_FILE, STATE_FILE, TRACKER

    config = parse_config(argv)
    model = build_model(config.model, config.moe, 512, transformer_config(config.model, config.moe))
    for layer in model.moe_layers:
        if hasattr(layer.router, "thresholds"):
            layer.router.thresholds.copy_(torch.linspace(0.15, 0.35, config.moe.num_experts))
            layer.router.thresholds_initialized.fill_(True)
    if stage == 2:
        model.enter_stage_two()
    directory = Path(out_dir) / "iter_0000003"
    directory.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory))
    (directory / CONFIG_FILE).write_text(dump_config(config))
    state = {"iteration": 3, "consumed_train_samples": 24, "stage": stage,
             "layout": {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "distributed_optimizer": False},
             "tokenizer_vocab_size": 500}
    (directory / STATE_FILE).write_text(json.dumps(state))
    (Path(out_dir) / TRACKER).write_text("3\n")
    return _forward(model, ids)


def evaluate(argv):
    """stablemoe-eval's run() in a worker."""
    from stablemoe_megatron.evaluate import run

    return run(argv)


def model_tensors(checkpoint) -> dict:
    """{megatron key: tensor} of every model tensor of a checkpoint (one process, no group)."""
    from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint

    ckpt = TorchDistCheckpoint(checkpoint)
    return {key: ckpt.read(key) for key in ckpt.model_tensors()}


_TRAINED = {}


def trained_checkpoint(tmp_path_factory) -> dict:
    """A tiny StableMoE trained on 2 ranks with EP=2 (paper layout, 2 sublayers per expert, stage 2
    from iteration 4), saved every 2 iterations; built once per test session.

    Returns {"data": tiny dataset info, "run": the --save directory, "results": trainer results}.
    """
    if "run" not in _TRAINED:
        from data_fixtures import tiny_dataset
        from trainer_cases import tiny_flags

        from distributed import run_distributed

        data = tiny_dataset(tmp_path_factory.mktemp("convert_data"))
        run = tmp_path_factory.mktemp("convert_run") / "ckpt"
        argv = tiny_flags(data, **{"--train-iters": 8, "--moe-stage2-start-iter": 4, "--save": run,
                                   "--save-interval": 2, "--moe-sublayers-per-expert": 2,
                                   "--expert-model-parallel-size": 2, "--log-interval": 4})
        results = run_distributed(train_quietly, 2, ep=2, args=(argv,))[0]
        _TRAINED.update(data=data, run=str(run), results=results)
    return dict(_TRAINED)


def train_quietly(argv):
    """trainer_cases.train without its per-iteration records."""
    from trainer_cases import train

    return train(argv)[0]


def base_flags(data: dict, *extra) -> list:
    """Model/data flags of a tiny model (2 layers, d 32, 4 heads, seq 32), plus ``extra``."""
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "8",
            "--data-path", data["prefix"], "--split", "90,10,0", "--tokenizer-model", data["tokenizer_model"],
            # the paper's settings where Megatron-LM's defaults differ (export needs bias-free linears)
            "--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear",
            "--clip-grad", "0.1", "--adam-beta2", "0.98", *[str(x) for x in extra]]
