"""--mock-data (megatron-core's MockGPTDataset) and --tokenizer-type NullTokenizer --vocab-size N.

The references are megatron-core's own: its ``NullTokenizer`` (the same definition as Megatron-LM's
``_NullTokenizer``: ids as text, vocab_size = N + 1, eod = N) and its ``MockGPTLowLevelDataset``
(the documents the mock dataset draws from, counted here by brute force).
"""
import math
import pickle

import numpy as np
import pytest

from distributed import run_distributed
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.tokenizer import TokenIdError, build_tokenizer
from trainer_cases import losses_by_iteration, tiny_flags, train

NULL = {"--tokenizer-type": "NullTokenizer", "--vocab-size": 64}
NO_FILES = {"--data-path": False, "--tokenizer-model": False, "--split": False}


def mock_flags(**overrides) -> list:
    """A tiny run on mock data with NullTokenizer (64 ids + eod); ``overrides`` as in tiny_flags."""
    return tiny_flags({"prefix": None, "tokenizer_model": None},
                      **{**NO_FILES, "--mock-data": True, **NULL, **overrides})


def mock_config(**overrides):
    from stablemoe_megatron.cli_args import parse_config

    config = parse_config(mock_flags(**overrides))
    config.validate(1)
    return config


def megatron_null_tokenizer(vocab_size):
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(vocab_size)


# ---- NullTokenizer -----------------------------------------------------------------------------

def test_null_tokenizer_is_megatrons_definition():
    ours, theirs = build_tokenizer("NullTokenizer", vocab_size=64), megatron_null_tokenizer(64)
    assert (ours.vocab_size, ours.eod) == (theirs.vocab_size, theirs.eod) == (65, 64)
    text = "5 0 63 17 64 3"
    assert ours.tokenize(text) == theirs.text_to_ids(text) == [5, 0, 63, 17, 64, 3]
    assert ours.detokenize([5, 0, 63, 64]) == theirs.ids_to_text([5, 0, 63, 64]) == "5 0 63 64"
    assert ours.tokenize(ours.detokenize(list(range(65)))) == list(range(65))
    # any whitespace separates (megatron-core splits on single spaces only); no text, no ids
    assert ours.tokenize(" 1\t2\n\n3  ") == [1, 2, 3] and ours.tokenize("") == []
    assert ours.id_to_piece(64) == "64"
    clone = pickle.loads(pickle.dumps(ours))
    assert (clone.vocab_size, clone.eod, clone.tokenize(text)) == (65, 64, ours.tokenize(text))


@pytest.mark.parametrize("text, message", [
    ("1 two 3", "'two' is not a token id: NullTokenizer reads integers separated by whitespace"),
    ("1 65", "token id 65 is outside [0, 64] (--vocab-size 64 plus the end-of-document id 64)"),
    ("-1", "token id -1 is outside [0, 64] (--vocab-size 64 plus the end-of-document id 64)"),
])
def test_null_tokenizer_refuses_what_is_not_an_id(text, message):
    with pytest.raises(TokenIdError) as exc:
        build_tokenizer("NullTokenizer", vocab_size=64).tokenize(text)
    assert str(exc.value) == message


@pytest.mark.parametrize("kwargs, message", [
    ({"tokenizer_type": "NullTokenizer"}, "--tokenizer-type NullTokenizer needs --vocab-size"),
    ({"tokenizer_type": "NullTokenizer", "vocab_size": 0},
     "--vocab-size 0: NullTokenizer needs a positive number of token ids"),
    ({"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "x.model", "vocab_size": 64},
     "--vocab-size 64 is only for --tokenizer-type NullTokenizer; SentencePieceTokenizer takes its vocabulary "
     "from its files: drop --vocab-size"),
])
def test_null_tokenizer_flags_are_checked(kwargs, message):
    with pytest.raises(ConfigError) as exc:
        build_tokenizer(**kwargs)
    assert str(exc.value) == message


# ---- the mock data -----------------------------------------------------------------------------

def test_mock_datasets_are_megatrons_split_evenly_whatever_split_says(tmp_path):
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    from stablemoe_megatron import data as data_lib

    config = mock_config(**{"--split": "90,10,0", "--eval-iters": 2, "--data-cache-path": tmp_path / "cache"})
    tokenizer = data_lib.tokenizer_from_config(config.data)
    datasets = data_lib.build_datasets(config, tokenizer, world_size=1)
    assert all(isinstance(ds, MockGPTDataset) for ds in datasets)
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").glob("*-document_index.npy"))
    assert cached == [f"MockGPTDataset-{part}-document_index.npy" for part in ("test", "train", "valid")]
    assert [len(ds.indices) for ds in datasets] == [33333, 33334, 33333]  # 100000 documents, 1:1:1
    assert len(datasets[0]) >= 20 * 8 and len(datasets[2]) >= 2 * 8
    sample = datasets[0][0]
    assert sample["tokens"].shape == (32,) and int(sample["tokens"].max()) <= 64
    # a mock document is 1, 2, ... (mod 65) then eod: every next token is the last one + 1, or eod, or 1
    tokens, labels = sample["tokens"].long(), sample["labels"].long()
    assert all(int(b) in ((int(a) + 1) % 65, 64, 1) for a, b in zip(tokens, labels))


def test_mock_token_counts_are_the_train_documents_counts(monkeypatch):
    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    from stablemoe_megatron import data as data_lib

    monkeypatch.setattr(MockGPTLowLevelDataset, "size", 3000)  # fewer documents: the brute force stays quick
    config = mock_config(**{"--vocab-size": 50})
    counts = data_lib.token_counts(config.data, 128).numpy()
    low = MockGPTLowLevelDataset(data_lib.MegatronTokenizerAdapter(data_lib.tokenizer_from_config(config.data)))
    brute = np.bincount(np.concatenate([low[i] for i in range(1000)]), minlength=128)  # train: documents 0..999
    assert counts.shape == (128,) and (counts == brute).all()
    assert counts.sum() == low.sequence_lengths[:1000].sum() and counts[51:].sum() == 0  # eod = 50 is the top id


def test_mock_probe_windows_come_from_the_validation_documents():
    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    from stablemoe_megatron import data as data_lib

    config = mock_config()
    rows = data_lib.probe_tokens(config.data, 200, 32, seed=3)
    assert rows.shape == (7, 32)
    low = MockGPTLowLevelDataset(data_lib.MegatronTokenizerAdapter(data_lib.tokenizer_from_config(config.data)))
    stream = np.concatenate([low[i] for i in range(33333, 33333 + 200)])  # the first validation documents
    text = " " + " ".join(map(str, stream.tolist())) + " "
    assert all(" " + " ".join(map(str, row.tolist())) + " " in text for row in rows)
    assert len({tuple(row.tolist()) for row in rows}) == 7  # distinct windows
    assert data_lib.probe_tokens(config.data, 200, 32, seed=3).equal(rows)


def _evaluate(argv):
    from stablemoe_megatron.evaluate import run

    return run([str(a) for a in argv])


def test_a_tiny_run_trains_on_mock_data_then_evaluates_and_exports(tmp_path):
    from stablemoe_megatron.export.exporter import export_checkpoint
    from stablemoe_megatron.export.inference import load

    metrics, run_dir = tmp_path / "metrics.jsonl", tmp_path / "run"
    argv = mock_flags(**{"--train-iters": 12, "--moe-stage2-start-iter": 6, "--metrics-file": metrics,
                         "--eval-interval": 12, "--save": run_dir})
    results, records = run_distributed(train, 1, args=(argv,))[0]
    losses = losses_by_iteration(records)
    assert sorted(losses) == list(range(1, 13)) and all(math.isfinite(v) for v in losses.values())
    assert losses[1] == pytest.approx(math.log(128), abs=0.3)  # about uniform over the 128 padded rows at first
    assert sum(losses[i] for i in (10, 11, 12)) / 3 < losses[1] - 0.4  # the progressions are learnable
    assert math.isfinite(results["validation_loss"])
    # evaluation rebuilds the mock validation data from the run's configuration
    evaluated = run_distributed(_evaluate, 1, args=(["--load", run_dir, "--eval-iters", "2"],))[0]
    assert evaluated["iteration"] == 12 and math.isfinite(evaluated["loss"])
    # the export keeps NullTokenizer's size (no file to copy) and loads it back
    exported = export_checkpoint(run_dir, tmp_path / "export", log=lambda _message: None)
    assert {k: exported.tokenizer[k] for k in ("tokenizer_type", "null_vocab_size", "vocab_size", "eod")} == {
        "tokenizer_type": "NullTokenizer", "null_vocab_size": 64, "vocab_size": 65, "eod": 64}
    _, tokenizer = load(tmp_path / "export")
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.tokenize("1 64")) == (65, 64, [1, 64])


# ---- bad combinations, as a user meets them --------------------------------------------------------

def _main(argv, monkeypatch, capsys):
    from stablemoe_megatron.train import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("overrides, message", [
    ({"--data-path": "/some/prefix"}, "--mock-data trains on synthetic tokens: drop --data-path (or --mock-data)"),
    ({"--valid-data-path": "/some/prefix"},
     "--mock-data trains on synthetic tokens: drop --valid-data-path (or --mock-data)"),
    ({"--test-data-path": "/some/prefix"},
     "--mock-data trains on synthetic tokens: drop --test-data-path (or --mock-data)"),
    ({"--vocab-size": False}, "--tokenizer-type NullTokenizer needs --vocab-size"),
    ({"--tokenizer-type": "SentencePieceTokenizer", "--vocab-size": False},
     "--tokenizer-model is required: pass the SentencePiece .model file (train one with stablemoe-train-tokenizer)"),
    ({"--mock-data": False}, "--data-path is required: a PREFIX of a .bin/.idx dataset (see tools/preprocess_data.py), "
                             "or --mock-data for synthetic tokens"),
])
def test_bad_combinations_stop_with_one_message(overrides, message, monkeypatch, capsys):
    code, err = _main(mock_flags(**overrides), monkeypatch, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].endswith(message), err
