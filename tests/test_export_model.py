"""Exported models: logits of the pure-torch ExportedGPT equal the Megatron model's, for every router
and layout; the safetensors file is standard; the export runs without megatron; perplexity and
greedy decoding; the streaming writer and the name mapping."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export import names
from stablemoe_megatron.export.exporter import export_checkpoint
from stablemoe_megatron.export.inference import generate, perplexity
from stablemoe_megatron.export.model import ExportedGPT
from stablemoe_megatron.export.safetensors_io import SafetensorsFile, SafetensorsWriter, storage_order
from distributed import run_distributed
from test_convert_helpers import base_flags, megatron_logits, random_checkpoint, token_batch, trained_checkpoint

REPO = Path(__file__).resolve().parents[1]
LOGIT_TOLERANCE = 1e-5  # float32 on CPU; measured differences are ~3e-7 (summation order only)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def _quiet(_message):
    pass


def test_exported_logits_and_loss_equal_megatron(trained, tmp_path):
    out = tmp_path / "export"
    config = export_checkpoint(trained["run"], out, log=_quiet)
    assert config.moe.routing_stage == 2 and config.source["layout"]["ep"] == 2
    ids = token_batch()
    reference = run_distributed(megatron_logits, 1, args=(trained["run"], ids))[0]
    model = ExportedGPT.from_pretrained(out)
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == reference.shape == (3, 32, 512)
    assert (logits - reference).abs().max().item() < LOGIT_TOLERANCE
    labels = torch.roll(ids, -1, dims=1)
    ref_loss = torch.nn.functional.cross_entropy(reference.flatten(0, 1), labels.reshape(-1))
    assert model.loss(ids, labels).item() == pytest.approx(ref_loss.item(), rel=1e-6)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.model"]


ARCHITECTURES = {
    "megatron-layout-switch-rope-rmsnorm-untied": (
        ["--num-experts", 4, "--moe-router", "switch", "--moe-layer-freq", 1, "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights"], 1),
    "hash-bottom-2-sublayers": (["--num-experts", 4, "--moe-router", "hash", "--moe-layer-positions", "bottom",
                                 "--moe-sublayers-per-expert", 2], 1),
    "expert-choice-scattered": (["--num-experts", 4, "--moe-router", "expert-choice",
                                 "--moe-layer-positions", "scattered", "--moe-sublayers-per-expert", 1], 1),
    "base-cnn-distilled-stage2": (["--num-experts", 4, "--moe-router", "base", "--moe-distill-router", "cnn",
                                   "--moe-sublayers-per-expert", 2], 2),
    "stablemoe-transformer-distilled-top-stage2": (
        ["--num-experts", 4, "--moe-router", "stablemoe", "--moe-distill-router", "transformer",
         "--moe-layer-positions", "top", "--moe-sublayers-per-expert", 1], 2),
    "switch-wordemb-megatron-layout-stage2": (
        ["--num-experts", 4, "--moe-router", "switch", "--moe-distill-router", "wordemb", "--moe-layer-freq", 2], 2),
    # backbone routing in stage 1 (the default, --moe-eval-routing distilled, exports as stage 2)
    "stablemoe-stage1": (["--num-experts", 4, "--moe-router", "stablemoe", "--moe-sublayers-per-expert", 3,
                          "--moe-eval-routing", "backbone"], 1),
    "dense": ([], 1),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_exported_logits_equal_megatron_for_every_router_and_layout(trained, tmp_path, name):
    extra, stage = ARCHITECTURES[name]
    argv = base_flags(trained["data"], *extra)
    ids = token_batch()
    reference = run_distributed(random_checkpoint, 1, args=(argv, str(tmp_path / "ckpt"), ids, stage))[0]
    config = export_checkpoint(tmp_path / "ckpt", tmp_path / "export", log=_quiet)
    assert (config.moe.routing_stage if config.moe else 1) == stage
    model = ExportedGPT.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        difference = (model(ids) - reference).abs().max().item()
    assert difference < LOGIT_TOLERANCE, difference


def test_stage_option_and_its_errors(trained, tmp_path):
    stage1 = Path(trained["run"]) / "iter_0000002"
    forced = export_checkpoint(stage1, tmp_path / "forced", stage=2, log=_quiet)
    assert forced.source["stage"] == 1 and forced.moe.routing_stage == 2
    reference = run_distributed(megatron_logits, 1, args=(str(stage1), token_batch(), True))[0]
    with torch.no_grad():
        assert (ExportedGPT.from_pretrained(tmp_path / "forced")(token_batch()) - reference).abs().max() < LOGIT_TOLERANCE
    with pytest.raises(ConfigError, match="stage 2"):
        export_checkpoint(trained["run"], tmp_path / "back", stage=1, log=_quiet)
    with pytest.raises(ConfigError, match="exists"):
        export_checkpoint(stage1, tmp_path / "forced", log=_quiet)
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.tmp").exists()


def test_bfloat16_export_and_official_safetensors_reader(trained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    out = tmp_path / "bf16"
    config = export_checkpoint(trained["run"], out, dtype="bfloat16", log=_quiet)
    assert config.dtype == "bfloat16"
    official = safetensors.load_file(str(out / "model.safetensors"))
    ours = SafetensorsFile(out / "model.safetensors").tensors()
    assert sorted(official) == sorted(ours)
    assert all(torch.equal(official[k], ours[k]) for k in ours)
    assert official["embed_tokens.weight"].dtype == torch.bfloat16
    assert official["layers.0.moe.distilled.embedding.weight"].shape == (512, 50)


def test_exported_model_runs_without_megatron(trained, tmp_path):
    out = tmp_path / "export"
    export_checkpoint(trained["run"], out, log=_quiet)
    script = (
        "import sys; sys.modules['megatron'] = None\n"  # any megatron import now fails
        "from stablemoe_megatron.export.inference import load, perplexity, token_stream, generate_text\n"
        f"model, tok = load({str(out)!r})\n"
        "result = perplexity(model, token_stream(tok, ['The quick brown fox.', 'A second document.']), 32)\n"
        "text = generate_text(model, tok, 'The', 5)\n"
        "assert not [m for m, v in sys.modules.items() if m.startswith('megatron') and v is not None]\n"
        "import json; print(json.dumps({'ppl': result['ppl'], 'text': text}))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout.strip().splitlines()[-1])
    assert 1.0 < values["ppl"] < 1e4 and isinstance(values["text"], str)


def test_perplexity_windows_and_greedy_generation(trained, tmp_path):
    export_checkpoint(trained["run"], tmp_path / "export", log=_quiet)
    model = ExportedGPT.from_pretrained(tmp_path / "export")
    stream = token_batch(batch=1, seq=80).reshape(-1)  # windows of 33 tokens: 0-32, 32-64, 64-79
    result = perplexity(model, stream, seq_length=32, batch_size=2)
    assert (result["tokens"], result["windows"], result["seq_length"]) == (79, 3, 32)
    pieces = [stream[0:33], stream[32:65], stream[64:80]]
    total = sum(float(model.loss(p[:-1].unsqueeze(0), p[1:].unsqueeze(0))) * (p.numel() - 1) for p in pieces)
    assert result["loss"] == pytest.approx(total / 79, rel=1e-5)
    prompt = stream[:5].tolist()
    new = generate(model, prompt, max_new_tokens=4, vocab_limit=500)
    context = list(prompt)
    for token in new:
        with torch.no_grad():
            assert token == int(model(torch.tensor([context]))[0, -1, :500].argmax())
        context.append(token)
    assert generate(model, prompt, max_new_tokens=4, stop_id=new[0]) == new[:1]


def test_streaming_writer_checks_order_and_cleans_up(tmp_path):
    specs = storage_order([("flag", torch.bool, ()), ("half", torch.bfloat16, (3,)), ("ids", torch.int64, (2,)),
                           ("w", torch.float32, (2, 2))])
    assert [s[0] for s in specs] == ["ids", "w", "half", "flag"]  # widest first: every tensor aligned
    writer = SafetensorsWriter(tmp_path / "a.safetensors", specs, {"k": "v"})
    with pytest.raises(ValueError, match="expected ids"):
        writer.write("w", torch.zeros(2, 2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    values = {"ids": torch.tensor([3, -1]), "w": torch.arange(4.0).view(2, 2),
              "half": torch.tensor([1.5, 2.0, -3.0], dtype=torch.bfloat16), "flag": torch.tensor(True)}
    writer = SafetensorsWriter(tmp_path / "a.safetensors", specs, {"k": "v"})
    for name, _, _ in specs:
        writer.write(name, values[name])
    writer.close()
    reader = SafetensorsFile(tmp_path / "a.safetensors")
    assert reader.metadata == {"k": "v"}
    assert all(torch.equal(reader.get(k), v) for k, v in values.items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_qkv_split_merge_round_trip_with_query_groups():
    heads, groups, head_dim, hidden = 8, 2, 4, 32
    fused = torch.randn((heads + 2 * groups) * head_dim, hidden)
    q, k, v = names.split_qkv(fused, heads, groups)
    assert q.shape == (32, 32) and k.shape == v.shape == (8, 32)
    # group 0's rows in megatron's order: its 4 query heads, then its key head, then its value head
    assert torch.equal(q[:16], fused[:16]) and torch.equal(k[:4], fused[16:20]) and torch.equal(v[:4], fused[20:24])
    assert torch.equal(names.merge_qkv(q, k, v, heads, groups), fused)


def test_every_checkpoint_key_has_one_name_and_unknown_keys_fail():
    assert names.export_names("decoder.layers.3.moe_block.experts.norms.1.experts.norm.bias") == \
        ["layers.3.moe.experts.1.norm.bias"]
    assert names.export_names("decoder.layers.0.mlp.router.distilled.convolutions.0.weight") == \
        ["layers.0.moe.distilled.convolutions.0.weight"]
    assert names.export_names("decoder.layers.2.pre_mlp_layernorm.weight") == ["layers.2.mlp_norm.weight"]
    assert not names.is_model_key("chained_0.optimizer.state.exp_avg.embedding.word_embeddings.weight")
    with pytest.raises(ConfigError, match="no exported name"):
        names.export_names("decoder.layers.0.self_attention.q_layernorm.weight")
