"""convert_checkpoint generate / perplexity on a tiny export: the prompt and the continuation are
detokenised together; sampling (temperature, top-k, top-p, repetition penalty, seed) against
independent references; one-line exit-2 errors for bad flag values; perplexity's JSON says what it
scored. The export is a randomly initialised dense ExportedGPT plus a 500-piece SentencePiece
model, written straight to disk (no Megatron training), so the module runs in seconds."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stablemoe_megatron.cli import convert_checkpoint, train_tokenizer
from stablemoe_megatron.export import inference
from stablemoe_megatron.export.inference import (Sampling, apply_repetition_penalty, generate, generate_text,
                                                  load, make_generator, next_token, perplexity, read_documents,
                                                  token_stream, top_k_filter, top_p_filter)
from stablemoe_megatron.export.model import ExportedGPT
from stablemoe_megatron.export.safetensors_io import SafetensorsWriter, storage_order
from stablemoe_megatron.export.schema import WEIGHTS_FILE, ExportedConfig, write_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The json module"


def _write_jsonl(path: Path, lines: int) -> Path:
    with open(REPO / "data" / "corpus" / "train.jsonl", encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:lines]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A dense 2-layer export (d 32, 512 embedding rows, 64 positions) with a trained tokenizer."""
    root = tmp_path_factory.mktemp("generate")
    corpus = _write_jsonl(root / "train.jsonl", 200)
    train_tokenizer.main(["--input", str(corpus), "--model-prefix", str(root / "spm"), "--vocab-size", "500"])
    out = root / "export"
    out.mkdir()
    (out / "tokenizer.model").write_bytes((root / "spm.model").read_bytes())
    config = ExportedConfig(vocab_size=512, tokenizer_vocab_size=500, num_layers=2, hidden_size=32,
                            ffn_hidden_size=64, num_attention_heads=4, num_query_groups=4, kv_channels=8,
                            max_position_embeddings=64, position_embedding_type="learned_absolute",
                            normalization="LayerNorm", layernorm_epsilon=1e-5, tie_word_embeddings=True,
                            dtype="float32", run_config={"model": {"seq_length": 32}},
                            tokenizer={"tokenizer_type": "SentencePieceTokenizer",
                                       "tokenizer_model": "tokenizer.model", "vocab_size": 500, "eod": 2})
    torch.manual_seed(0)
    state = ExportedGPT(config).state_dict()
    for name in ("embed_tokens.weight", "embed_positions.weight"):  # GPT-style std 0.02: a flat next-token
        state[name] = state[name] * 0.02                            # distribution, so seeds matter
    specs = storage_order([(name, t.dtype, tuple(t.shape)) for name, t in state.items()])
    writer = SafetensorsWriter(out / WEIGHTS_FILE, specs)
    for name, _, _ in specs:
        writer.write(name, state[name])
    writer.close()
    write_config(out, config)
    return out


@pytest.fixture(scope="module")
def loaded(export_dir):
    return load(export_dir)


class OneTokenModel:
    """Stands in for ExportedGPT: every position predicts ``token`` (logits [1, S, V])."""

    def __init__(self, token: int, vocab: int = 512):
        self.token, self.config = token, SimpleNamespace(max_position_embeddings=64, vocab_size=vocab)

    def __call__(self, context: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, context.shape[1], self.config.vocab_size)
        logits[..., self.token] = 10.0
        return logits


def _word_start_piece(tokenizer) -> int:
    """The id of a word-start piece "▁<letters>" (SentencePiece's marker of a preceding space)."""
    for token_id in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(token_id)
        if piece.startswith("\u2581") and len(piece) > 2 and piece[1:].isalpha():
            return token_id
    raise AssertionError("no word-start piece in the tokenizer")


def test_prompt_and_continuation_are_detokenised_together(loaded, monkeypatch, capsys):
    _, tokenizer = loaded
    word = _word_start_piece(tokenizer)
    text = generate_text(OneTokenModel(word), tokenizer, PROMPT, max_new_tokens=1)
    assert text == tokenizer.detokenize(tokenizer.tokenize(PROMPT) + [word])
    assert text == PROMPT + " " + tokenizer.id_to_piece(word)[1:]  # the space of "▁" survives
    monkeypatch.setattr(inference, "load", lambda _: (OneTokenModel(word), tokenizer))
    assert convert_checkpoint.main(["generate", "unused", "--prompt", PROMPT, "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_generate_command_prints_one_detokenisation(export_dir, loaded, capsys):
    model, tokenizer = loaded
    prompt_ids = tokenizer.tokenize(PROMPT)
    sampling = Sampling(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3)
    new = generate(model, prompt_ids, 10, stop_id=tokenizer.eod, vocab_limit=500, sampling=sampling,
                   generator=make_generator(5)[0])
    new = new[:-1] if new and new[-1] == tokenizer.eod else new
    argv = ["generate", str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.3", "--seed", "5"]
    assert convert_checkpoint.main(argv) == 0
    assert capsys.readouterr().out == tokenizer.detokenize(prompt_ids + new) + "\n"


def test_top_k_1_sampling_equals_greedy(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.tokenize(PROMPT)
    greedy = generate(model, prompt, 12, vocab_limit=500)
    for seed in (0, 1, 2):
        sampled = generate(model, prompt, 12, vocab_limit=500, sampling=Sampling(temperature=1.5, top_k=1),
                           generator=make_generator(seed)[0])
        assert sampled == greedy
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    kept = top_k_filter(logits, 1).isfinite()
    assert torch.equal(kept.nonzero()[:, 1], logits.argmax(dim=-1))
    assert top_k_filter(logits, 5).isfinite().sum(dim=-1).tolist() == [5] * 4


def _nucleus_reference(logits: torch.Tensor, p: float) -> set:
    """Indices kept by top-p, by a plain loop in float64: most likely first until the mass reaches p."""
    probs = torch.softmax(logits.double(), dim=-1).tolist()
    kept, mass = set(), 0.0
    for index in sorted(range(len(probs)), key=lambda i: -probs[i]):
        kept.add(index)
        mass += probs[index]
        if mass >= p:
            break
    return kept


def test_top_p_filter_matches_an_independent_reference():
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        logits = torch.randn(64, generator=generator) * (0.5 + trial / 50)
        p = float(torch.rand((), generator=generator)) * 0.98 + 0.01
        got = set(top_p_filter(logits, p).isfinite().nonzero().flatten().tolist())
        assert got == _nucleus_reference(logits, p), (trial, p)
    rows = torch.randn(3, 64, generator=generator)
    batched = top_p_filter(rows, 0.7)
    for row in range(3):
        assert set(batched[row].isfinite().nonzero().flatten().tolist()) == _nucleus_reference(rows[row], 0.7)
        kept = batched[row].isfinite()
        assert torch.equal(batched[row][kept], rows[row][kept])  # kept logits unchanged
    assert torch.equal(top_p_filter(rows, 1.0), rows)


def test_repetition_penalty_matches_a_hand_computed_reference():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(30, generator=generator)
    seen = torch.tensor([3, 7, 3, 12, 29, 0, 7])
    expected = logits.clone()
    for index in {3, 7, 12, 29, 0}:  # each seen id once, however often it was seen
        value = float(logits[index])
        expected[index] = value / 1.7 if value > 0 else value * 1.7
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.7), expected, rtol=0, atol=1e-7)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    rows = torch.randn(2, 30, generator=generator)
    both = apply_repetition_penalty(rows, torch.tensor([[1, 2], [2, 5]]), 2.0)
    assert torch.equal(both[0], apply_repetition_penalty(rows[0], torch.tensor([1, 2]), 2.0))
    assert torch.equal(both[1], apply_repetition_penalty(rows[1], torch.tensor([2, 5]), 2.0))
    # greedy with a penalty moves off a seen best token once the penalty outweighs the margin
    step = torch.tensor([2.0, 1.9, -1.0])
    assert next_token(step, torch.tensor([0]), Sampling()) == 0
    assert next_token(step, torch.tensor([0]), Sampling(repetition_penalty=1.2)) == 1


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([0.0, math.log(2.0), math.log(4.0)])
    generator = make_generator(7)[0]
    draws = [next_token(logits, torch.tensor([], dtype=torch.long), Sampling(temperature=2.0), generator)
             for _ in range(4000)]
    expected = torch.softmax(logits / 2.0, dim=-1)
    observed = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert (observed - expected).abs().max() < 0.03, (observed, expected)
    assert next_token(logits, torch.tensor([], dtype=torch.long), Sampling(temperature=1e-30)) == 2  # no NaN


def test_same_seed_same_text_different_seed_different_text(loaded):
    model, tokenizer = loaded
    sampling = Sampling(temperature=1.0)
    first = generate_text(model, tokenizer, PROMPT, 12, sampling=sampling, seed=11)
    assert generate_text(model, tokenizer, PROMPT, 12, sampling=sampling, seed=11) == first
    assert generate_text(model, tokenizer, PROMPT, 12, sampling=sampling, seed=12) != first
    assert first.startswith(PROMPT)


def test_seed_flag_reproduces_cli_output(export_dir, capsys):
    def run(*extra):
        assert convert_checkpoint.main(["generate", str(export_dir), "--prompt", PROMPT, "--max-new-tokens", "12",
                                        "--temperature", "1", *extra]) == 0
        return capsys.readouterr()

    first = run("--seed", "3")
    assert run("--seed", "3").out == first.out and run("--seed", "4").out != first.out
    unseeded = run()
    assert "sampling seed" in unseeded.err and "--seed" in unseeded.err


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-p", "0"),
                                        ("--top-p", "1.5"), ("--top-k", "-1"), ("--repetition-penalty", "0"),
                                        ("--repetition-penalty", "-2"), ("--seed", "-1"), ("--max-new-tokens", "0")])
def test_bad_sampling_values_are_one_line_exit_2(export_dir, capsys, flag, value):
    argv = ["generate", str(export_dir), "--prompt", PROMPT, flag, value]
    assert convert_checkpoint.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("convert_checkpoint: error:") and flag in err and "\n" not in err, err
    assert captured.out == ""


def test_perplexity_json_says_what_it_scored(export_dir, loaded, tmp_path, capsys):
    model, tokenizer = loaded
    corpus = _write_jsonl(tmp_path / "test.jsonl", 5)
    stream = token_stream(tokenizer, read_documents(corpus))
    assert convert_checkpoint.main(["perplexity", str(export_dir), "--input", str(corpus), "--seq-length", "16",
                                    "--batch-size", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == stream.numel() - 1  # every token but the first, once
    assert result["windows"] == math.ceil((stream.numel() - 1) / 16) and result["seq_length"] == 16
    assert result["documents"] == 5 and result["input"] == str(corpus)
    assert result["loss"] == pytest.approx(perplexity(model, stream, 16)["loss"], rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert convert_checkpoint.main(["perplexity", str(export_dir), "--input", str(corpus)]) == 0
    assert json.loads(capsys.readouterr().out)["seq_length"] == 32  # training's --seq-length by default
    assert convert_checkpoint.main(["perplexity", str(export_dir), "--input", str(corpus), "--seq-length", "0"]) == 2
    assert "--seq-length must be >= 1" in capsys.readouterr().err
    assert convert_checkpoint.main(["perplexity", str(export_dir), "--input", str(corpus), "--seq-length", "65"]) == 2
    assert "--seq-length 65 exceeds the model's 64 positions" in capsys.readouterr().err
