"""Tokenizer layer, stablemoe-train-tokenizer, and the bundled corpus."""
import collections
import json
import os
import pickle
import re
import sys

import pytest

from stablemoe_megatron.cli import train_tokenizer
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "corpus")
SPLITS = ("train", "valid", "test")
UNUSUAL_TEXT = "Grüße, 東京 ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\tindented  code:\n        return x ** 2  \n"


def read_split(name):
    with open(os.path.join(CORPUS, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train(tmp_dir, *extra):
    """Train on the small valid split; returns the model path."""
    prefix = os.path.join(tmp_dir, "sp")
    train_tokenizer.main([
        "--input", os.path.join(CORPUS, "valid.jsonl"), "--model-prefix", prefix, *extra,
    ])
    return prefix + ".model"


# ---- SentencePiece training ---------------------------------------------------------------------

def test_train_tokenizer_is_deterministic_and_has_requested_vocab(tmp_path):
    model = train(tmp_path, "--vocab-size", "700", "--seed", "7")
    first = open(model, "rb").read()
    os.remove(model)
    train(tmp_path, "--vocab-size", "700", "--seed", "7")
    assert open(model, "rb").read() == first

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == 700
    assert tok.id_to_piece(tok.eod) == "</s>"
    doc = read_split("test")[0]["text"]
    assert tok.detokenize(tok.tokenize(doc)) == doc
    ids = tok.tokenize(UNUSUAL_TEXT)  # byte fallback: nothing maps to <unk> (id 0)
    assert 0 not in ids
    assert tok.detokenize(ids) == UNUSUAL_TEXT


def test_max_sentences_sample_depends_on_seed_only(tmp_path):
    def pieces(seed, sub):
        os.makedirs(tmp_path / sub)
        model = train(str(tmp_path / sub), "--vocab-size", "400", "--max-sentences", "300", "--seed", seed)
        tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
        return [tok.id_to_piece(i) for i in range(tok.vocab_size)]

    seed1 = pieces("1", "a")
    assert pieces("1", "b") == seed1
    assert pieces("2", "c") != seed1


def test_unigram_model_and_pickling(tmp_path):
    model = train(tmp_path, "--vocab-size", "600", "--model-type", "unigram")
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == 600
    os.remove(model)  # the pickled tokenizer carries the model itself, not its path
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(UNUSUAL_TEXT) == tok.tokenize(UNUSUAL_TEXT)
    assert clone.eod == tok.eod


def test_train_tokenizer_user_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_tokenizer.main(["--input", str(tmp_path / "missing.jsonl"), "--model-prefix", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "--input" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(SystemExit) as exc:
        train_tokenizer.main(["--input", str(bad), "--model-prefix", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert f"{bad}:2" in capsys.readouterr().err


# ---- build_tokenizer errors ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"tokenizer_type": "WordPieceTokenizer"}, "--tokenizer-type"),
    ({"tokenizer_type": "SentencePieceTokenizer"}, "--tokenizer-model"),
    ({"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/nonexistent/x.model"}, "--tokenizer-model"),
    ({"tokenizer_type": "GPT2BPETokenizer", "merge_file": __file__}, "--vocab-file"),
    ({"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "/nonexistent"}, "--tokenizer-model"),
])
def test_build_tokenizer_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        build_tokenizer(**kwargs)


def test_sentencepiece_rejects_a_non_model_file(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a valid SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(junk))


# ---- GPT-2 BPE and Hugging Face tokenizer.json ----------------------------------------------------

@pytest.fixture(scope="module")
def byte_level_bpe(tmp_path_factory):
    """A tiny GPT-2-style byte-level BPE trained with the `tokenizers` package, saved to disk."""
    tokenizers = pytest.importorskip("tokenizers", reason="the optional 'tokenizers' package is not installed")
    out = tmp_path_factory.mktemp("bpe")
    hf = tokenizers.ByteLevelBPETokenizer()
    texts = [d["text"] for d in read_split("valid")]
    hf.train_from_iterator(texts, vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False)
    hf.save_model(str(out))
    hf.save(str(out / "tokenizer.json"))
    return out, tokenizers


def test_gpt2_bpe_tokenizer_from_local_vocab_and_merges(byte_level_bpe):
    out, tokenizers = byte_level_bpe
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(out / "vocab.json"), merge_file=str(out / "merges.txt"))
    reference = tokenizers.ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    doc = read_split("test")[1]["text"]
    assert tok.tokenize(doc) == reference.encode(doc).ids
    assert tok.detokenize(tok.tokenize(doc)) == doc
    assert tok.detokenize(tok.tokenize(UNUSUAL_TEXT)) == UNUSUAL_TEXT
    assert tok.eod == json.loads((out / "vocab.json").read_text())["<|endoftext|>"]
    assert tok.vocab_size == reference.get_vocab_size()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(doc) == tok.tokenize(doc)


def test_huggingface_tokenizer_directory_uses_declared_eos(byte_level_bpe):
    out, _ = byte_level_bpe
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out))
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=str(out / "vocab.json"), merge_file=str(out / "merges.txt"))
    doc = read_split("test")[2]["text"]
    assert tok.tokenize(doc) == gpt2.tokenize(doc)
    assert tok.id_to_piece(tok.eod) == "<|endoftext|>"


def test_huggingface_tokenizer_without_any_eos_is_an_error(tmp_path, byte_level_bpe):
    _, tokenizers = byte_level_bpe
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.add_tokens(["hello", "world"])
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="eos_token"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "world"}}))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tok.id_to_piece(tok.eod) == "world"


# ---- bundled corpus -----------------------------------------------------------------------------

def test_bundled_corpus_splits_are_real_disjoint_english():
    splits = {name: read_split(name) for name in SPLITS}
    for name, docs in splits.items():
        assert docs, f"{name}.jsonl is empty"
        for doc in docs:
            assert isinstance(doc["text"], str) and len(doc["text"]) > 200
            assert isinstance(doc["source"], str) and doc["source"].endswith(".rst")
    keys = {name: {(d["source"], d["title"]) for d in docs} for name, docs in splits.items()}
    texts = {name: {d["text"] for d in docs} for name, docs in splits.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not keys[a] & keys[b]
        assert not texts[a] & texts[b]
    assert len(splits["train"]) > 20 * len(splits["valid"])
    words = collections.Counter(re.findall(r"[a-z]+", " ".join(d["text"].lower() for d in splits["train"])))
    top = {w for w, _ in words.most_common(10)}
    assert {"the", "of", "a"} <= top
    total = sum(os.path.getsize(os.path.join(CORPUS, f"{n}.jsonl")) for n in SPLITS)
    assert total < 8_000_000
    leftover_roles = sum(len(re.findall(r":(?:func|meth|class|mod|ref):`", d["text"])) for d in splits["train"])
    assert leftover_roles == 0


def test_rst_to_text_renders_roles_and_directives():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import rst_to_text
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    ctx = rst_to_text.Context(label_titles={"tut-intro": "An Informal Introduction"})
    inline = rst_to_text.render_inline(
        "Call :func:`len` or :meth:`~dict.get`, see :ref:`tut-intro` and ``x = *y*`` in `the docs"
        " <https://docs.python.org>`_ (:pep:`8`, **bold**, *emph*).", ctx)
    assert inline == ("Call len() or get(), see An Informal Introduction and x = *y* in the docs "
                      "(PEP 8, bold, emph).")
    rst = [
        "Title", "=====", "", ".. index:: single: hidden", "", ".. function:: spam(eggs)", "",
        "   Return :class:`int`.", "", "   .. versionchanged:: 3.8", "      Faster.", "",
        "Example::", "", "   print(1)", "", ".. this is a comment", "   spanning lines",
    ]
    blocks = rst_to_text.Renderer(ctx, max_code_lines=10).render(rst)
    assert blocks == [
        ("title", "Title"), ("prose", "spam(eggs)"), ("prose", "Return int."),
        ("prose", "Changed in version 3.8: Faster."), ("prose", "Example:"), ("code", "print(1)"),
    ]
