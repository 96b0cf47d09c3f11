"""A tiny tokenized dataset built from the bundled corpus, shared by the data and trainer tests.

    info = tiny_dataset(tmp_dir)
    info["prefix"]           # {tmp_dir}/train_text_document (200 documents of data/corpus/train.jsonl)
    info["prefix2"]          # {tmp_dir}/extra_text_document (the next 60 train documents, for blends)
    info["valid_prefix"]     # {tmp_dir}/valid_text_document (data/corpus/valid.jsonl)
    info["tokenizer_model"]  # {tmp_dir}/spm.model, a 500-piece SentencePiece BPE model
    info["vocab_size"]       # 500

Built with the project's own CLIs (train_tokenizer, preprocess_data with --append-eod), so the
files are exactly what a user would make. Cached by directory: a second call with the same
directory (in this process or a later one) returns the finished files without rebuilding.
"""
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
VOCAB_SIZE = 500
TRAIN_DOCS = 200
EXTRA_DOCS = 60
DONE = "tiny_dataset.json"


def _write_lines(src: Path, dst: Path, start: int, stop: int) -> None:
    with open(src, encoding="utf-8") as f:
        lines = f.readlines()[start:stop]
    dst.write_text("".join(lines), encoding="utf-8")


def tiny_dataset(tmp_dir) -> dict:
    """Build (once per directory) and describe the tiny dataset; see the module docstring."""
    from stablemoe_megatron.cli import preprocess_data, train_tokenizer

    root = Path(tmp_dir)
    done = root / DONE
    if done.is_file():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    _write_lines(CORPUS / "train.jsonl", root / "train.jsonl", 0, TRAIN_DOCS)
    _write_lines(CORPUS / "train.jsonl", root / "extra.jsonl", TRAIN_DOCS, TRAIN_DOCS + EXTRA_DOCS)
    train_tokenizer.main(["--input", str(root / "train.jsonl"), "--model-prefix", str(root / "spm"),
                          "--vocab-size", str(VOCAB_SIZE), "--max-sentences", "20000"])
    model = str(root / "spm.model")
    for name, src in (("train", root / "train.jsonl"), ("extra", root / "extra.jsonl"),
                      ("valid", CORPUS / "valid.jsonl")):
        preprocess_data.main(["--input", str(src), "--output-prefix", str(root / name),
                              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                              "--append-eod"])
    info = {
        "dir": str(root),
        "prefix": str(root / "train_text_document"),
        "prefix2": str(root / "extra_text_document"),
        "valid_prefix": str(root / "valid_text_document"),
        "tokenizer_model": model,
        "vocab_size": VOCAB_SIZE,
    }
    tmp = done.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, done)
    return info
