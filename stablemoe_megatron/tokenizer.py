"""A small, offline tokenizer layer shared by the data tools, the trainer, evaluation and reports.

``build_tokenizer`` takes Megatron-LM's tokenizer flag names (``--tokenizer-type``,
``--tokenizer-model``, ``--vocab-file``, ``--merge-file``, ``--vocab-size``) and returns an object with

* ``tokenize(text) -> list[int]`` (no BOS/EOS added: the caller decides about end-of-document),
* ``detokenize(ids) -> str``,
* ``vocab_size`` (number of ids the tokenizer can emit, before any Megatron padding),
* ``eod`` (the end-of-document id appended by ``--append-eod`` and used as the document separator),
* ``id_to_piece(i) -> str`` (a readable token, for reports).

Supported types:

* ``SentencePieceTokenizer``: a local ``.model`` file (e.g. from ``stablemoe-train-tokenizer``);
  ``eod`` is the model's EOS id.
* ``GPT2BPETokenizer``: a local GPT-2 ``vocab.json`` + ``merges.txt``; byte-level BPE with GPT-2's
  pre-tokenisation, built with the Hugging Face ``tokenizers`` package (``pip install tokenizers``),
  because megatron-core's GPT-2 tokenizer needs ``transformers``. ``eod`` is ``<|endoftext|>``.
  As in Megatron-LM, the literal text ``<|endoftext|>`` inside a document is tokenised as text.
* ``HuggingFaceTokenizer``: a local directory holding ``tokenizer.json`` (or that file itself), also
  via ``tokenizers``; ``eod`` is the ``eos_token`` of ``tokenizer_config.json`` or
  ``special_tokens_map.json`` next to it, else the first of a few common EOS spellings.
* ``NullTokenizer``: no file, ``--vocab-size N``; Megatron-LM's ``_NullTokenizer``: the text IS the
  token ids, written as integers separated by whitespace; ``vocab_size`` is ``N + 1`` and ``eod`` is
  ``N`` (the one id it adds). For synthetic data (``--mock-data``), benchmarks and pre-tokenized
  text. Megatron-LM splits on single spaces (``text.split(' ')``); this one splits on any whitespace,
  which gives the same ids for every text Megatron-LM accepts and also reads line breaks, tabs and an
  empty text (no ids). Ids outside ``[0, N]`` are refused (:class:`TokenIdError`).

Everything is offline: nothing is downloaded. Tokenizer objects pickle as their serialised model
(not as a path), so they can be sent to ``multiprocessing`` workers and rebuilt there cheaply.
Optional dependencies are imported only when a tokenizer that needs them is built.
"""
import json
import os
from typing import List, Optional, Sequence

from stablemoe_megatron.errors import ConfigError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer")

GPT2_EOD_TOKEN = "<|endoftext|>"
# Tried in order when a Hugging Face tokenizer directory does not declare its eos_token.
COMMON_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


class TokenIdError(ConfigError):
    """A text given to NullTokenizer holds something that is not a token id of its vocabulary (a
    ConfigError, so a command line prints the one-line message; preprocess_data adds ``file:line``)."""


class NullTextTokenizer:
    """Megatron-LM's NullTokenizer: whitespace-separated integer ids; ``vocab_size = N + 1``, ``eod = N``.

    ``N`` is ``--vocab-size``: the ids ``0 .. N-1`` are the "text" ids and ``N`` is the end-of-document
    id it adds (megatron-core's ``NullTokenizer`` and Megatron-LM's ``_NullTokenizer`` alike).
    """

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConfigError(f"--vocab-size {vocab_size}: NullTokenizer needs a positive number of token ids")
        self._vocab_size_without_eod = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._vocab_size_without_eod

    def tokenize(self, text: str) -> List[int]:
        """``"3 1 4"`` -> ``[3, 1, 4]``; raises TokenIdError on a word that is not an id in ``[0, N]``."""
        ids = []
        for word in text.split():
            try:
                token_id = int(word)
            except ValueError:
                raise TokenIdError(f"{word[:40]!r} is not a token id: NullTokenizer reads integers "
                                   "separated by whitespace") from None
            if not 0 <= token_id < self.vocab_size:
                raise TokenIdError(f"token id {token_id} is outside [0, {self.eod}] (--vocab-size "
                                   f"{self._vocab_size_without_eod} plus the end-of-document id {self.eod})")
            ids.append(token_id)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def id_to_piece(self, token_id: int) -> str:
        return str(int(token_id))

    def __getstate__(self):
        return {"vocab_size": self._vocab_size_without_eod}

    def __setstate__(self, state):
        self.__init__(state["vocab_size"])

    def __repr__(self) -> str:
        return f"NullTextTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTextTokenizer:
    """Wraps a ``sentencepiece`` model; ``eod`` is the model's EOS id."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        import sentencepiece

        self._source = source
        self._model_proto = model_proto
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(model_proto)
        eos_id = self._sp.eos_id()
        if eos_id < 0:
            raise ConfigError(
                f"--tokenizer-model {source}: this SentencePiece model has no EOS piece, so there is no "
                "end-of-document id; retrain it with eos_id set (stablemoe-train-tokenizer does this)"
            )
        self._eod = eos_id

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __getstate__(self):
        return {"model_proto": self._model_proto, "source": self._source}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self) -> str:
        return f"SentencePieceTextTokenizer({self._source!r}, vocab_size={self.vocab_size})"


class HFTextTokenizer:
    """Wraps a Hugging Face ``tokenizers.Tokenizer`` (used for GPT-2 BPE and tokenizer.json files)."""

    def __init__(self, tokenizer_json: str, eod_token: str, tokenizer_type: str, source: str):
        tokenizers = _import_tokenizers(tokenizer_type)
        self.tokenizer_type = tokenizer_type
        self._source = source
        self._json = tokenizer_json
        self._eod_token = eod_token
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise ConfigError(
                f"{source}: the tokenizer has no token {eod_token!r} to use as end-of-document id; "
                "use a vocabulary that contains it"
            )
        self._eod = eod

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        return piece if piece is not None else f"<id {int(token_id)}>"

    def __getstate__(self):
        return {
            "tokenizer_json": self._json,
            "eod_token": self._eod_token,
            "tokenizer_type": self.tokenizer_type,
            "source": self._source,
        }

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"HFTextTokenizer({self.tokenizer_type}, {self._source!r}, vocab_size={self.vocab_size})"


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
):
    """Build a tokenizer from local files; raises ConfigError naming the flag and the fix on bad input.

    ``vocab_size`` (``--vocab-size``) is NullTokenizer's size without its end-of-document id; the other
    types read their vocabulary from their files and refuse it (Megatron-LM would ignore it silently,
    leaving a run whose vocabulary is not the one asked for).
    """
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTextTokenizer(vocab_size)
    if vocab_size is not None and tokenizer_type in TOKENIZER_TYPES:
        raise ConfigError(f"--vocab-size {vocab_size} is only for --tokenizer-type NullTokenizer; "
                          f"{tokenizer_type} takes its vocabulary from its files: drop --vocab-size")
    if tokenizer_type == "SentencePieceTokenizer":
        return _build_sentencepiece(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return _build_gpt2_bpe(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return _build_huggingface(tokenizer_model)
    raise ConfigError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; use one of: {', '.join(TOKENIZER_TYPES)}"
    )


def _require_file(path: Optional[str], flag: str, what: str) -> str:
    """Return ``path`` if it is an existing file, else raise a ConfigError naming ``flag``."""
    if not path:
        raise ConfigError(f"{flag} is required: pass {what}")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file; pass {what}")
    return path


def _import_tokenizers(tokenizer_type: str):
    """Import the optional Hugging Face ``tokenizers`` package or explain how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            f"--tokenizer-type {tokenizer_type} needs the 'tokenizers' package: "
            "pip install tokenizers (or pip install 'stablemoe-megatron[hf]')"
        ) from None
    return tokenizers


def _build_sentencepiece(model_path: Optional[str]) -> SentencePieceTextTokenizer:
    path = _require_file(
        model_path, "--tokenizer-model",
        "the SentencePiece .model file (train one with stablemoe-train-tokenizer)",
    )
    with open(path, "rb") as f:
        proto = f.read()
    try:
        return SentencePieceTextTokenizer(proto, source=path)
    except ConfigError:
        raise
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a non-model file
        raise ConfigError(
            f"--tokenizer-model {path}: not a valid SentencePiece model ({exc}); "
            "pass the .model file written by stablemoe-train-tokenizer"
        ) from None


def _build_gpt2_bpe(vocab_file: Optional[str], merge_file: Optional[str]) -> HFTextTokenizer:
    _require_file(vocab_file, "--vocab-file", "the GPT-2 vocab.json for GPT2BPETokenizer")
    _require_file(merge_file, "--merge-file", "the GPT-2 merges.txt for GPT2BPETokenizer")
    tokenizers = _import_tokenizers("GPT2BPETokenizer")
    try:
        tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab_file, merge_file))
    except Exception as exc:  # the Rust side raises plain Exception on malformed files
        raise ConfigError(
            f"--vocab-file {vocab_file} / --merge-file {merge_file}: could not be read as GPT-2 BPE "
            f"files ({exc}); pass a vocab.json and the matching merges.txt"
        ) from None
    # GPT-2: byte-level pre-tokenisation with GPT-2's regex, no prefix space, byte-level decoding.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return HFTextTokenizer(tok.to_str(), GPT2_EOD_TOKEN, "GPT2BPETokenizer", vocab_file)


def _build_huggingface(model_path: Optional[str]) -> HFTextTokenizer:
    what = "a local directory containing tokenizer.json (or the tokenizer.json file itself)"
    if not model_path:
        raise ConfigError(f"--tokenizer-model is required for HuggingFaceTokenizer: pass {what}")
    json_path = os.path.join(model_path, "tokenizer.json") if os.path.isdir(model_path) else model_path
    if not os.path.isfile(json_path):
        raise ConfigError(
            f"--tokenizer-model {model_path}: {json_path} does not exist; pass {what} "
            "(models are never downloaded)"
        )
    tokenizers = _import_tokenizers("HuggingFaceTokenizer")
    try:
        tok = tokenizers.Tokenizer.from_file(json_path)
    except Exception as exc:
        raise ConfigError(
            f"--tokenizer-model {json_path}: not a valid tokenizer.json ({exc}); pass {what}"
        ) from None
    eod_token = _find_hf_eos_token(os.path.dirname(os.path.abspath(json_path)), tok)
    if eod_token is None:
        raise ConfigError(
            f"--tokenizer-model {model_path}: cannot tell the end-of-document token; add "
            '"eos_token" to tokenizer_config.json next to tokenizer.json'
        )
    return HFTextTokenizer(tok.to_str(), eod_token, "HuggingFaceTokenizer", json_path)


def _find_hf_eos_token(directory: str, tok) -> Optional[str]:
    """The eos_token declared next to tokenizer.json, else the first common EOS spelling in the vocab."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for candidate in COMMON_EOS_TOKENS:
        if tok.token_to_id(candidate) is not None:
            return candidate
    return None
