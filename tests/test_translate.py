"""Translation with the pure-torch encoder-decoder: its logits equal megatron's (checkpoint and export,
several routers and layouts), cached decoding equals decoding the whole prefix, beam 1 is greedy,
beam search beats greedy on most sentences, BLEU/chrF are sacrebleu's, export = checkpoint
translations (also without megatron installed), and the CLI's messages for bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from stablemoe_megatron.cli.translate import main
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.exporter import export_checkpoint
from stablemoe_megatron.export.seq2seq import ExportedSeq2Seq
from stablemoe_megatron.export.translate import (
    Search, beam_search, corpus_scores, encode_sources, greedy_search, load_model, max_lengths, read_records,
    translate_texts)
from distributed import run_distributed
from translate_cases import (
    EOS, batch, jsonl, megatron_logits, model_flags, random_encoder_decoder, random_gpt, sentence_pairs, train,
    write_parallel_text)

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOLERANCE = 1e-5  # float32 on CPU; summation order only


def _quiet(_message):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("mt_data") / "pairs")
    write_parallel_text(prefix, 300, seed=0)
    return prefix


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A translation model trained 12 iterations (StableMoE, paper block of 2 sublayers, stage 2 from 6)."""
    run = tmp_path_factory.mktemp("mt_run") / "ckpt"
    argv = model_flags(data, "--num-experts", 4, "--moe-sublayers-per-expert", 2, "--moe-stage2-start-iter", 6,
                       "--train-iters", 12, "--save", run, "--save-interval", 12, "--label-smoothing", 0.1)
    run_distributed(train, 1, args=(argv,))
    return str(run)


ROUTERS = {  # name: (flags, routing stage)
    "stablemoe-stage1-backbone": (["--num-experts", 4, "--moe-sublayers-per-expert", 2,
                                   "--moe-eval-routing", "backbone"], 1),
    "stablemoe-stage2-wordemb": (["--num-experts", 4, "--moe-sublayers-per-expert", 3], 2),
    "hash-bottom": (["--num-experts", 4, "--moe-router", "hash", "--moe-layer-positions", "bottom"], 1),
    "switch-megatron-layout-rope-rmsnorm-untied-nobias": (
        ["--num-experts", 4, "--moe-router", "switch", "--moe-layer-freq", 1, "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights", "--disable-bias-linear"], 1),
    "base-cnn-distilled-stage2": (["--num-experts", 4, "--moe-router", "base", "--moe-distill-router", "cnn"], 2),
    "dense": ([], 1),
}


@pytest.fixture(scope="module")
def random_models(data, tmp_path_factory):
    """{name: (checkpoint dir, megatron logits)} of perturbed fresh models of every ROUTERS entry."""
    out = {}
    for name, (flags, stage) in ROUTERS.items():
        directory = str(tmp_path_factory.mktemp(name))
        out[name] = (directory, run_distributed(random_encoder_decoder, 1,
                                                args=(model_flags(data, *flags), directory, stage))[0])
    return out


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_teacher_forced_logits_equal_megatron(random_models, tmp_path, name):
    directory, reference = random_models[name]
    model, _ = load_model(checkpoint=directory)
    source, padding, target = batch()
    with torch.no_grad():
        logits = model(source, padding, target)
    assert logits.shape == reference.shape == (3, 7, 128)
    assert (logits - reference).abs().max().item() < LOGIT_TOLERANCE
    config = export_checkpoint(directory, tmp_path / "export", log=_quiet)
    assert config.moe is None or config.moe.routing_stage == ROUTERS[name][1]
    with torch.no_grad():
        exported = ExportedSeq2Seq.from_pretrained(tmp_path / "export")(source, padding, target)
    assert (exported - logits).abs().max().item() < 1e-6  # same weights (memory alignment may change the sums)


def test_trained_checkpoint_logits_equal_megatron(trained):
    source, padding, target = batch()
    reference = run_distributed(megatron_logits, 1, args=(trained, source, padding, target))[0]
    model, _ = load_model(checkpoint=trained)
    assert model.config.moe.routing_stage == 2 and [p.layer for p in model.config.moe.layers] == [0, 2]
    with torch.no_grad():
        assert (model(source, padding, target) - reference).abs().max().item() < LOGIT_TOLERANCE


def _sources(count=6, seed=1):
    ids = [[int(t) for t in src.split()] + [EOS] for src, _ in sentence_pairs(count, seed)]
    width = max(len(s) for s in ids)
    source = torch.full((len(ids), width), EOS)
    padding = torch.ones(len(ids), width, dtype=torch.bool)
    for row, s in enumerate(ids):
        source[row, :len(s)], padding[row, :len(s)] = torch.tensor(s), False
    return source, padding, torch.tensor([len(s) for s in ids])


def _rescore(model, source, padding, tokens, lenpen=1.0):
    """(sum of log-probabilities of tokens + EOS, that / (len + 1) ** lenpen) by one teacher-forced pass."""
    target = torch.tensor([[EOS] + tokens])
    labels = torch.tensor(tokens + [EOS])
    with torch.no_grad():
        lprobs = F.log_softmax(model(source[None], padding[None], target)[0].float(), dim=-1)
    total = lprobs.gather(1, labels[:, None]).sum().item()
    return total, total / (len(tokens) + 1) ** lenpen


def _checkpoint(trained, random_models, which):
    return trained if which == "trained" else random_models[which][0]


VOCAB_LIMIT = EOS + 1  # the tokenizer's ids; the embedding's padding rows are never generated


@pytest.mark.parametrize("which", ["trained", "base-cnn-distilled-stage2", "hash-bottom"])
def test_cached_decoding_equals_full_prefix_decoding(trained, random_models, which):
    model, _ = load_model(checkpoint=_checkpoint(trained, random_models, which))
    source, padding, lengths = _sources()
    search = Search(max_len_b=12)
    limits = max_lengths(model, lengths, search)
    cached = greedy_search(model, source, padding, limits, search, VOCAB_LIMIT)
    full = greedy_search(model, source, padding, limits, search, VOCAB_LIMIT, use_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in full]
    assert [h.score for h in cached] == pytest.approx([h.score for h in full], abs=1e-5)
    assert all(max(h.tokens, default=0) < VOCAB_LIMIT and EOS not in h.tokens for h in cached)
    with torch.no_grad():  # step logits with the cache == logits of the whole prefix, for every position
        for row, hyp in enumerate(cached):
            inputs = torch.tensor([[EOS] + hyp.tokens])
            memory = model.encode(source[row:row + 1], padding[row:row + 1])
            state = model.start(memory, padding[row:row + 1])
            stepped = torch.cat([model.step(state, inputs[:, t:t + 1]) for t in range(inputs.shape[1])], dim=1)
            whole = model(source[row:row + 1], padding[row:row + 1], inputs)
            assert (stepped - whole).abs().max().item() < LOGIT_TOLERANCE


@pytest.mark.parametrize("which", ["trained", "stablemoe-stage2-wordemb"])
def test_beam_one_is_greedy_and_scores_are_the_models(trained, random_models, which):
    model, _ = load_model(checkpoint=_checkpoint(trained, random_models, which))
    source, padding, lengths = _sources(count=8, seed=2)
    for lenpen in (1.0, 0.0):
        search = Search(lenpen=lenpen, max_len_a=0.5, max_len_b=2)  # sentences end at different steps
        limits = max_lengths(model, lengths, search)
        assert limits.tolist() == [int(0.5 * n + 2) for n in lengths.tolist()] and len(set(limits.tolist())) > 2
        greedy = greedy_search(model, source, padding, limits, search, VOCAB_LIMIT)
        one = beam_search(model, source, padding, limits, Search(beam_size=1, lenpen=lenpen), VOCAB_LIMIT)
        assert [h[0].tokens for h in one] == [h.tokens for h in greedy]
        assert [h[0].score for h in one] == [h.score for h in greedy]
        beams = beam_search(model, source, padding, limits, Search(beam_size=4, lenpen=lenpen), VOCAB_LIMIT)
        for row, (best, hyp) in enumerate(zip(beams, greedy)):
            assert len(best) == 4 and [h.score for h in best] == sorted((h.score for h in best), reverse=True)
            for candidate in (best[0], best[-1], hyp):  # the reported scores are the model's
                assert _rescore(model, source[row], padding[row], candidate.tokens, lenpen) == pytest.approx(
                    (candidate.logprob, candidate.score), abs=1e-4)
                assert 1 <= len(candidate.tokens) <= limits[row]


@pytest.mark.parametrize("which", ["stablemoe-stage2-wordemb", "switch-megatron-layout-rope-rmsnorm-untied-nobias"])
def test_beam_beats_greedy(random_models, which):
    """Beam search's best score >= greedy's on most sentences and on average. Not on every one: no
    beam search is exact (greedy's prefix can fall out of the beam, and fairseq's rule stops a
    sentence once k hypotheses finished), so a per-sentence claim would not be a property."""
    model, _ = load_model(checkpoint=random_models[which][0])
    source, padding, lengths = _sources(count=8, seed=2)
    for lenpen in (1.0, 0.0):
        limits = max_lengths(model, lengths, Search(lenpen=lenpen))
        greedy = greedy_search(model, source, padding, limits, Search(lenpen=lenpen), VOCAB_LIMIT)
        beams = beam_search(model, source, padding, limits, Search(beam_size=4, lenpen=lenpen), VOCAB_LIMIT)
        gains = [best[0].score - hyp.score for best, hyp in zip(beams, greedy)]
        assert sum(g >= -1e-6 for g in gains) >= 6 and sum(gains) > 0 and max(gains) > 1e-3, gains


def test_scores_equal_sacrebleu_per_language_and_average():
    hyps = ["the cat sat on the mat", "a dog barks", "hello world", "good morning to you", "it rains"]
    refs = ["the cat sat on a mat", "the dog barks", "hello there world", "good morning", "it is raining"]
    langs = ["fr", "de", "fr", "de", "cs"]
    scores = corpus_scores(hyps, refs, langs)
    assert list(scores["languages"]) == ["cs", "de", "fr"]
    for lang in ("cs", "de", "fr"):
        h = [x for x, l in zip(hyps, langs) if l == lang]
        r = [x for x, l in zip(refs, langs) if l == lang]
        assert scores["languages"][lang]["bleu"] == sacrebleu.corpus_bleu(h, [r]).score
        assert scores["languages"][lang]["chrf"] == sacrebleu.corpus_chrf(h, [r]).score
        assert scores["languages"][lang]["sentences"] == len(h)
    for metric in ("bleu", "chrf"):
        values = [scores["languages"][lang][metric] for lang in ("cs", "de", "fr")]
        assert scores["average"][metric] == pytest.approx(sum(values) / 3, rel=1e-12)
    assert scores["languages"]["fr"]["bleu"] > 0 and "tok:13a" in scores["signatures"]["bleu"]


def _records(count=10):
    return [{"lang": "xx" if i % 3 else "yy", "src": f"<{'xx' if i % 3 else 'yy'}> {src}", "tgt": tgt}
            for i, (src, tgt) in enumerate(sentence_pairs(count, seed=4))]


def test_cli_export_equals_checkpoint_and_scores(trained, tmp_path, capsys):
    records = [{**r, "src": r["src"].split(" ", 1)[1]} for r in _records()]  # the NullTokenizer has no tags
    data = jsonl(tmp_path / "test.jsonl", records)
    export_checkpoint(trained, tmp_path / "export", log=_quiet)
    common = ["--input", str(data), "--beam-size", "3", "--batch-size", "4"]
    assert main(["--checkpoint", trained, *common, "--output", str(tmp_path / "a.jsonl"), "--score",
                 "--score-json", str(tmp_path / "s.json")]) == 0
    table = capsys.readouterr().out
    assert main(["--exported", str(tmp_path / "export"), *common, "--output", str(tmp_path / "b.txt")]) == 0
    from_checkpoint = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    from_export = (tmp_path / "b.txt").read_text().splitlines()
    assert [r["hyp"] for r in from_checkpoint] == from_export and len(from_export) == len(records)
    assert [{k: v for k, v in r.items() if k != "hyp"} for r in from_checkpoint] == records
    scores = json.loads((tmp_path / "s.json").read_text())
    expected = corpus_scores(from_export, [r["tgt"] for r in records], [r["lang"] for r in records])
    assert scores == json.loads(json.dumps(expected))
    assert table.splitlines()[0].split() == ["lang", "sentences", "BLEU", "chrF"]
    assert table.splitlines()[3].split()[:2] == ["average", "10"]
    model, tokenizer = load_model(exported=tmp_path / "export")  # the library path gives the same
    assert translate_texts(model, tokenizer, [r["src"] for r in records], Search(beam_size=3)) == from_export
    sources, truncated = encode_sources(tokenizer, ["3 4 5", " ".join(["7"] * 20)], model)
    assert sources == [[3, 4, 5, EOS], [7] * 15 + [EOS]] and truncated == 1  # as training truncates


def _error(capsys, argv) -> str:
    """The one-line message of a failed CLI call (after any library warnings printed first)."""
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_errors(trained, data, tmp_path, capsys):
    good = jsonl(tmp_path / "in.jsonl", _records(2))
    missing = tmp_path / "nowhere"
    assert _error(capsys, ["--checkpoint", str(missing), "--input", str(good)]) == \
        f"stablemoe-translate: error: --checkpoint {missing}: no such checkpoint directory"
    no_tgt = jsonl(tmp_path / "no_tgt.jsonl", [{"lang": "xx", "src": "3 4"}])
    assert _error(capsys, ["--checkpoint", trained, "--input", str(no_tgt), "--score"]) == (
        f"stablemoe-translate: error: --score: {no_tgt}:1: the record has no \"tgt\" string "
        f"(--score needs \"lang\", \"src\" and \"tgt\" per line)")
    gpt = tmp_path / "gpt"
    run_distributed(random_gpt, 1, args=(str(gpt),))
    assert _error(capsys, ["--checkpoint", str(gpt), "--input", str(good)]) == (
        f"stablemoe-translate: error: --checkpoint {gpt}: a gpt checkpoint (run_config.yaml model.model_family: "
        f"gpt); translation needs a --model-family encoder_decoder model (for a language model use stablemoe-eval "
        f"or convert_checkpoint perplexity/generate)")
    export_checkpoint(gpt, tmp_path / "gpt_export", log=_quiet)
    assert _error(capsys, ["--exported", str(tmp_path / "gpt_export"), "--input", str(good)]) == (
        f"stablemoe-translate: error: {tmp_path / 'gpt_export'}: a GPT (decoder-only) export, not a translation "
        f"model: its config.json has no 'encoder_decoder' section (export a --model-family encoder_decoder "
        f"checkpoint)")
    assert _error(capsys, ["--checkpoint", trained, "--input", str(missing)]) == \
        f"stablemoe-translate: error: --input {missing}: no such file"
    assert _error(capsys, ["--checkpoint", trained, "--input", str(good), "--beam-size", "0"]) == \
        "stablemoe-translate: error: --beam-size must be >= 1, got 0"
    assert _error(capsys, ["--checkpoint", trained, "--input", str(good), "--lang", "fr"]) == (
        f"stablemoe-translate: error: --lang is for plain-text --input: the records of {good} carry their "
        f"tag in \"src\"")
    text = tmp_path / "in.txt"
    text.write_text("3 4 5\n")
    assert _error(capsys, ["--checkpoint", trained, "--input", str(text), "--score"]) == (
        f"stablemoe-translate: error: --score needs a .jsonl --input with \"lang\", \"src\" and \"tgt\" per line; "
        f"{text} is plain text")
    assert _error(capsys, ["--exported", str(tmp_path), "--input", str(good)]) == (
        f"stablemoe-translate: error: {tmp_path}: no config.json; not an exported model directory "
        f"(make one with: convert_checkpoint.py export CHECKPOINT OUT_DIR)")


def test_read_records_text_and_jsonl(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("Ouvrir le fichier\r\nFermer\n")
    assert read_records(text, "fr") == [{"src": "<fr> Ouvrir le fichier", "lang": "fr"},
                                        {"src": "<fr> Fermer", "lang": "fr"}]
    assert read_records(text) == [{"src": "Ouvrir le fichier"}, {"src": "Fermer"}]
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"lang": "de", "src": "<de> Da\u2028tei", "tgt": "File"}, ensure_ascii=False)
                       + "\n\n" + json.dumps({"src": "<fi> x"}) + "\n")
    assert read_records(records) == [{"lang": "de", "src": "<de> Da\u2028tei", "tgt": "File"}, {"src": "<fi> x"}]
    bad = jsonl(tmp_path / "bad.jsonl", [{"lang": "de", "text": "x"}])
    with pytest.raises(ConfigError, match=f"--input {bad}:1: expected a JSON object with a \"src\" string"):
        read_records(bad)
    with pytest.raises(ConfigError, match="the record has no \"lang\" string"):
        read_records(jsonl(tmp_path / "nolang.jsonl", [{"src": "<de> a", "tgt": "b"}]), score=True)


def test_export_translates_without_megatron(trained, tmp_path):
    export_checkpoint(trained, tmp_path / "export", log=_quiet)
    script = (
        "import sys; sys.modules['megatron'] = None\n"  # any megatron import now fails
        "from stablemoe_megatron.export.translate import Search, load_model, translate_texts\n"
        f"model, tokenizer = load_model(exported={str(tmp_path / 'export')!r})\n"
        "hyps = translate_texts(model, tokenizer, ['3 4 5', '9 8 7 6'], Search(beam_size=2))\n"
        "assert not [m for m, v in sys.modules.items() if m.startswith('megatron') and v is not None]\n"
        "import json; print(json.dumps(hyps))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_model(exported=tmp_path / "export")
    expected = translate_texts(model, tokenizer, ["3 4 5", "9 8 7 6"], Search(beam_size=2))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.export.model import ExportedGPT

    with pytest.raises(ConfigError) as err:  # the GPT tools (perplexity, generate) say what to use
        ExportedGPT.from_pretrained(tmp_path / "export")
    assert str(err.value) == (f"{tmp_path / 'export' / 'config.json'}: a translation (encoder-decoder) export: "
                              f"translate with tools/translate.py --exported DIR (perplexity/generate are for "
                              f"GPT exports)")


def test_inspect_counts_both_stacks(trained):
    """convert_checkpoint inspect on a translation checkpoint: both stacks' MoE layers and every
    parameter (the total equals the megatron model's parameter count)."""
    from stablemoe_megatron.cli_args import config_from_yaml_text
    from stablemoe_megatron.export.summary import describe

    info = describe(trained)
    assert info["moe"]["moe_layers"] == {"encoder.0": "after", "decoder.0": "after"}
    assert info["parameters"]["distilled"] == 2 * (info["model"]["vocab_rows"] * 50 + 4 * 50)
    config = config_from_yaml_text((Path(trained) / "run_config.yaml").read_text())
    model = run_distributed(_parameter_count, 1, args=(config,))[0]
    assert info["parameters"]["total"] == model


def _parameter_count(config):
    from stablemoe_megatron.training.build import build

    trainer = build(config, "bench", vocab_size=128)
    try:
        return sum(p.numel() for p in trainer.model.parameters())
    finally:
        trainer.release()
