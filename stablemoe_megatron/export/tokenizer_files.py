"""The tokenizer of an export: copied next to the weights, described in config.json, loaded back.

The training run's tokenizer flags (``run_config.yaml``) name files on the training machine; the
export copies them under fixed names so the directory is self-contained:

=========================  ================================================================
SentencePieceTokenizer     ``tokenizer.model``
GPT2BPETokenizer           ``vocab.json`` + ``merges.txt``
HuggingFaceTokenizer       ``hf_tokenizer/`` (tokenizer.json and its tokenizer_config.json /
                           special_tokens_map.json when present)
NullTokenizer              no file: its ``--vocab-size`` goes to config.json (``null_vocab_size``)
=========================  ================================================================

Paths moved since training can be given with ``tokenizer_files`` (``--tokenizer-model``,
``--vocab-file``, ``--merge-file`` on the command line).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from stablemoe_megatron.errors import ConfigError

HF_EXTRA = ("tokenizer_config.json", "special_tokens_map.json")


def _source(data, overrides: dict, name: str) -> Optional[str]:
    value = overrides.get(name) or getattr(data, name)
    if value and not Path(value).exists():
        raise ConfigError(f"the tokenizer file {value} (from the checkpoint's run_config.yaml) does not exist "
                          f"here; pass --{name.replace('_', '-')} PATH")
    return value


def copy_tokenizer(data, dest, overrides: dict, vocab_rows: int) -> dict:
    """Copy the tokenizer into ``dest``; return config.json's ``tokenizer`` entry."""
    kind = data.tokenizer_type
    dest = Path(dest)
    entry = {"tokenizer_type": kind}
    if kind == "SentencePieceTokenizer":
        shutil.copyfile(_source(data, overrides, "tokenizer_model"), dest / "tokenizer.model")
        entry["tokenizer_model"] = "tokenizer.model"
    elif kind == "GPT2BPETokenizer":
        shutil.copyfile(_source(data, overrides, "vocab_file"), dest / "vocab.json")
        shutil.copyfile(_source(data, overrides, "merge_file"), dest / "merges.txt")
        entry.update(vocab_file="vocab.json", merge_file="merges.txt")
    elif kind == "HuggingFaceTokenizer":
        src = Path(_source(data, overrides, "tokenizer_model"))
        folder = src if src.is_dir() else src.parent
        (dest / "hf_tokenizer").mkdir()
        shutil.copyfile(src / "tokenizer.json" if src.is_dir() else src, dest / "hf_tokenizer" / "tokenizer.json")
        for extra in HF_EXTRA:
            if (folder / extra).is_file():
                shutil.copyfile(folder / extra, dest / "hf_tokenizer" / extra)
        entry["tokenizer_model"] = "hf_tokenizer"
    elif kind == "NullTokenizer":  # token ids as text: nothing to copy
        entry["null_vocab_size"] = int(data.vocab_size)
    else:
        raise ConfigError(f"tokenizer type {kind!r} cannot be exported")
    tokenizer = load_tokenizer(dest, entry)
    if tokenizer.vocab_size > vocab_rows:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                          f"{vocab_rows} rows: pass the tokenizer the model was trained with")
    entry.update(vocab_size=int(tokenizer.vocab_size), eod=int(tokenizer.eod))
    return entry


def load_tokenizer(export_dir, entry: dict):
    """The project tokenizer of an export directory (``entry``: config.json's ``tokenizer``)."""
    from stablemoe_megatron.tokenizer import build_tokenizer

    root = Path(export_dir)

    def path(name):
        return str(root / entry[name]) if entry.get(name) else None

    return build_tokenizer(entry["tokenizer_type"], path("tokenizer_model"), path("vocab_file"), path("merge_file"),
                           entry.get("null_vocab_size"))
