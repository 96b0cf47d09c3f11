"""Helpers of tests/test_translate.py (module-level, so the gloo workers can import them). No tests here.

``random_encoder_decoder``, ``random_gpt`` and ``megatron_logits`` run inside ``run_distributed``
workers (world 1; process group and parallel_state already set up).
"""
import json
from pathlib import Path

import numpy as np
import torch

VOCAB = 64  # NullTokenizer --vocab-size: ids 0..63, EOS 64, embedding rows padded to 128
EOS = VOCAB
ROWS = 128


def write_parallel_text(prefix: str, pairs: int, seed: int) -> None:
    """``prefix_{src,tgt}_document`` .bin/.idx: sources of 3..11 ids in [3, 30), targets = reversed + 30."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    src = IndexedDatasetBuilder(prefix + "_src_document.bin", dtype=np.int32)
    tgt = IndexedDatasetBuilder(prefix + "_tgt_document.bin", dtype=np.int32)
    for _ in range(pairs):
        length = rng.randint(3, 12)
        ids = rng.randint(3, 30, size=length)
        src.add_document(torch.tensor(ids), [length])
        tgt.add_document(torch.tensor(ids[::-1] + 30), [length])
    src.finalize(prefix + "_src_document.idx")
    tgt.finalize(prefix + "_tgt_document.idx")


def sentence_pairs(count: int, seed: int):
    """[(source text, target text)] of the synthetic task (NullTokenizer text: ids with spaces)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(count):
        ids = rng.randint(3, 30, size=rng.randint(3, 12))
        out.append((" ".join(map(str, ids)), " ".join(map(str, ids[::-1] + 30))))
    return out


def model_flags(prefix: str, *extra) -> list:
    """A tiny translation model (2 + 2 layers, d 32, 4 heads, 16 positions) on the synthetic data."""
    return ["--model-family", "encoder_decoder", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "8",
            "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-3", "--lr-warmup-iters", "2",
            "--data-path", prefix, "--valid-data-path", prefix, "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB), "--hidden-dropout", "0", "--attention-dropout", "0",
            "--log-interval", "5", "--eval-interval", "1000", "--eval-iters", "1", "--seed", "5",
            *[str(x) for x in extra]]


def batch():
    """(source [3, 9], padding [3, 9], decoder input [3, 7]): rows padded differently, ids < 65."""
    generator = torch.Generator().manual_seed(3)
    source = torch.randint(0, VOCAB, (3, 9), generator=generator)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 7:] = True
    source[padding] = EOS
    source[0, 4] = source[1, 8] = source[2, 6] = EOS
    target = torch.randint(0, VOCAB + 1, (3, 7), generator=generator)
    target[:, 0] = EOS
    return source, padding, target


def _logits(model, source, padding, target):
    model.eval()
    with torch.no_grad():
        return model(source, target, padding).float()


def _perturb(model, seed: int) -> None:
    """Every parameter (biases, norms, zero-initialised expert outputs too) plus N(0, 0.05) noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def _save(model, config, out_dir: str, stage: int, iteration: int = 3) -> None:
    from megatron.core import dist_checkpointing

    from stablemoe_megatron.checkpoint.format import write_iteration
    from stablemoe_megatron.cli_args import dump_config

    state = {"iteration": iteration, "consumed_train_samples": 24, "stage": stage,
             "layout": {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "distributed_optimizer": False},
             "tokenizer_vocab_size": VOCAB + 1}
    def payload(directory):
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory))

    write_iteration(out_dir, iteration, payload, dump_config(config), state)


def random_encoder_decoder(argv, out_dir: str, stage: int = 1):
    """Save a perturbed fresh encoder-decoder of ``argv`` (routing ``stage``) as our checkpoint;
    return its megatron logits on :func:`batch`."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.model.encdec import build_model
    from stablemoe_megatron.model.gpt import transformer_config_for

    config = parse_config(argv)
    model = build_model(config, ROWS, transformer_config_for(config))
    _perturb(model, 17)
    if stage == 2:
        model.enter_stage_two()
    _save(model, config, out_dir, stage)
    return _logits(model, *batch())


def megatron_logits(checkpoint: str, source, padding, target):
    """Logits of the megatron encoder-decoder loaded from ``checkpoint``, as stablemoe-eval routes."""
    from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
    from stablemoe_megatron.model.encdec import build_model
    from stablemoe_megatron.model.gpt import transformer_config_for
    from stablemoe_megatron.training.checkpointing import load_checkpoint

    ckpt = TorchDistCheckpoint(checkpoint)
    rows = ckpt.model_tensors()["embedding.word_embeddings.weight"].shape[0]
    model = build_model(ckpt.config, rows, transformer_config_for(ckpt.config))
    saved = load_checkpoint(ckpt.directory, model, layout={"world": "this test"}, load_optim=False)
    if saved.stage == 2:
        model.enter_stage_two()
    return _logits(model, source, padding, target)


def random_gpt(out_dir: str) -> None:
    """A fresh tiny GPT (mock data) saved as our checkpoint: a model translate must refuse."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.model.gpt import build_model, transformer_config

    config = parse_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                           "--seq-length", "16", "--micro-batch-size", "2", "--train-iters", "1", "--mock-data",
                           "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--disable-bias-linear"])
    model = build_model(config.model, config.moe, ROWS, transformer_config(config.model, config.moe))
    _save(model, config, out_dir, 1)


def train(argv) -> None:
    """The trainer on ``argv`` (its --save is the checkpoint)."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.loop import pretrain

    pretrain(parse_config(argv))


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
