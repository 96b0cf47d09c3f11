"""Synthetic parallel text and tiny encoder-decoder runs for the translation tests (importable by
the multi-rank test workers).

The data: NullTokenizer ids (vocabulary 64 + the end-of-document id 64), each target the reversed
source shifted by 30, so a model can learn it; written with megatron's IndexedDatasetBuilder as the
``PREFIX_src_document`` / ``PREFIX_tgt_document`` pair that preprocess_data writes.
"""
from pathlib import Path

VOCAB = 64


def write_pair(prefix, count: int, seed: int = 0, target_count=None) -> str:
    """Write ``count`` synthetic pairs (``target_count`` targets, default the same); return PREFIX."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.RandomState(seed)
    prefix = str(prefix)
    src = IndexedDatasetBuilder(prefix + "_src_document.bin", dtype=np.int32)
    tgt = IndexedDatasetBuilder(prefix + "_tgt_document.bin", dtype=np.int32)
    sources = [rng.randint(3, 30, size=rng.randint(3, 12)) for _ in range(count)]
    for i, source in enumerate(sources):
        src.add_document(torch.tensor(source), [len(source)])
    for source in sources[: count if target_count is None else target_count]:
        tgt.add_document(torch.tensor(source[::-1] + 30), [len(source)])
    src.finalize(prefix + "_src_document.idx")
    tgt.finalize(prefix + "_tgt_document.idx")
    return prefix


def parallel_data(root) -> dict:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "valid_tgt_document.idx").exists():
        write_pair(root / "train", 600, seed=0)
        write_pair(root / "valid", 64, seed=1)
    return {"train": str(root / "train"), "valid": str(root / "valid")}


def mt_flags(data: dict, **overrides) -> list:
    """Flags of a tiny encoder-decoder StableMoE run; ``overrides`` replace or add flags."""
    from trainer_cases import tiny_flags

    flags = {
        "--model-family": "encoder_decoder", "--num-layers": 2, "--hidden-size": 32, "--num-attention-heads": 4,
        "--seq-length": 12, "--micro-batch-size": 4, "--global-batch-size": 8, "--train-iters": 12,
        "--lr": 3e-3, "--lr-warmup-iters": 2, "--num-experts": 4, "--moe-router": "stablemoe",
        "--moe-sublayers-per-expert": 1, "--moe-stage2-start-iter": 6, "--moe-layer-positions": "middle",
        "--data-path": data["train"], "--valid-data-path": data["valid"], "--split": False,
        "--tokenizer-type": "NullTokenizer", "--vocab-size": VOCAB, "--tokenizer-model": False,
        "--log-interval": 1, "--eval-interval": 1000, "--eval-iters": 1, "--seed": 7,
        "--label-smoothing": 0.1, "--make-vocab-size-divisible-by": 64,  # 65 ids -> 128 rows under TP 1 and 2
    }
    flags.update(overrides)
    return tiny_flags({"prefix": None, "tokenizer_model": None}, **flags)  # False drops a flag
