"""The routing probe in real tiny CPU training runs: StableMoE routing is exactly still after the
switch, hash routing never changes, Switch routing does; probing leaves training untouched; the
probe agrees across parallel layouts; the history survives resume; the report on real runs."""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import tiny_dataset
from stablemoe_megatron.analysis.history import CURVE, PROBE_DIR, ProbeHistory
from stablemoe_megatron.analysis.locate import locate_history
from distributed import run_distributed

ITERS, EVERY, SWITCH_AT, TOKENS = 20, 4, 8, 256


def flags(data, out_dir, router="stablemoe", probe=True, **extra) -> list:
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3",
            "--num-experts", "4", "--moe-router", router, "--moe-sublayers-per-expert", "1",
            "--data-path", data["prefix"], "--split", "90,10,0", "--tokenizer-model", data["tokenizer_model"],
            "--log-interval", "2", "--eval-interval", "1000", "--eval-iters", "0", "--seed", "7",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--disable-bias-linear", "--clip-grad", "0.1",
            "--adam-beta2", "0.98",
            "--metrics-file", str(Path(out_dir) / "metrics.jsonl"), "--tensorboard-dir", str(Path(out_dir) / "tb")]
    if router == "stablemoe":
        argv += ["--moe-stage2-start-iter", str(SWITCH_AT)]
    if probe:
        argv += ["--routing-probe-interval", str(EVERY), "--routing-probe-tokens", str(TOKENS)]
    for key, value in extra.items():
        argv += [key] if value is True else [key, str(value)]
    return argv


def train(argv):
    """Worker: run the trainer; on the last rank return (JSONL records, printed log)."""
    import torch

    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.loop import pretrain

    config = parse_config(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(config)
    if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return None
    lines = Path(config.logging.metrics_file).read_text().splitlines()
    return [json.loads(line) for line in lines], out.getvalue()


def run(data, out_dir, world=1, **kw):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return run_distributed(train, world, args=(flags(data, out_dir, **kw),))[-1]


def probes(records):
    return [r["routing_probe"] for r in records if "routing_probe" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("probe_data"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Single-process runs per router kind, trained on first use: runs[router] = (run dir, records, log)."""
    class Runs(dict):
        def __missing__(self, router):
            path = tmp_path_factory.mktemp(router)
            self[router] = (path,) + run(data, path, router=router)
            return self[router]

    return Runs()


def test_stablemoe_routing_is_exactly_still_after_the_switch(runs):
    path, records, log = runs["stablemoe"]
    logged = probes(records)
    assert [p["iteration"] for p in logged] == [4, 8, 12, 16, 20] and [p["stage"] for p in logged] == [1, 1, 2, 2, 2]
    layer = [p["layers"][0] for p in logged]
    assert layer[0]["changed_fraction"] is None
    assert layer[1]["changed_fraction"] > 0                       # stage 1 still learns the routing
    assert [x["changed_fraction"] for x in layer[3:]] == [0.0, 0.0]   # stage 2: a function of the token id
    assert [x["distilled_changed_fraction"] for x in layer[2:]] == [0.0, 0.0, 0.0]  # frozen at the switch
    assert all(sum(x["tokens_per_expert"]) == TOKENS for x in layer)
    assert 0 <= layer[1]["distill_agreement"] <= 1

    history = ProbeHistory.load(path)
    assert history.iterations.tolist() == [4, 8, 12, 16, 20]
    # stage 2 routes by the distilled router frozen after iteration 8: exactly its choice at the probe of 8
    assert np.array_equal(history.choices(1, "routed")[2], history.choices(1, "distilled")[1])
    curve = json.loads((path / PROBE_DIR / CURVE).read_text())
    routed = next(e for e in curve["layers"] if e["view"] == "routed")
    assert routed["curve"][0] > 0 and all(v == 0 for v in routed["curve"][40:])   # last change at step 8 of 20
    assert [r["routing_fluctuation"] for r in records if "routing_fluctuation" in r] == [curve]
    assert "routing fluctuation over 5 probes of 256 tokens to iteration 20" in log
    assert f"layer 1 routed: {routed['after_20']:.1f}% / 0.0% / 0.0%" in log

    line = next(r for r in records if r.get("iteration") == 20 and "lm_loss" in r)
    assert line["routing_changed"] == "L1 0.00%"
    stats = line["moe_layers"]["1"]
    assert {"load_min", "load_max", "load_mean", "load_cv", "load_max_over_mean", "dead_experts",
            "dropped_fraction"} <= set(stats)
    assert stats["load_mean"] == pytest.approx(8 * 32 / 4)


def test_probe_and_load_scalars_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["stablemoe"][0] / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"routing_probe/layer1/changed_fraction", "routing_probe/layer1/distill_agreement",
            "routing_fluctuation/layer1/routed/after_20pct", "moe/layer1/load_cv", "moe/layer1/dead_experts",
            "moe/layer1/load_max_over_mean"} <= tags
    changed = [(e.step, e.value) for e in events.Scalars("routing_probe/layer1/changed_fraction")]
    assert [step for step, _ in changed] == [8, 12, 16, 20] and changed[-1][1] == 0.0


def test_probing_does_not_change_training(data, runs, tmp_path):
    _, probed, _ = runs["stablemoe"]
    plain, _ = run(data, tmp_path, probe=False)
    losses = lambda records: {r["iteration"]: r["lm_loss"] for r in records if "lm_loss" in r}  # noqa: E731
    assert losses(plain) == losses(probed)
    metrics = lambda records: [r["moe_layers"] for r in records if "lm_loss" in r]  # noqa: E731
    assert metrics(plain) == metrics(probed)  # the probe forward adds nothing to the training statistics
    assert not probes(plain) and not (tmp_path / PROBE_DIR).exists()


def test_hash_routing_never_changes_and_switch_routing_does(runs):
    hashed = [p["layers"][0]["changed_fraction"] for p in probes(runs["hash"][1])]
    assert hashed == [None, 0.0, 0.0, 0.0, 0.0]
    table = ProbeHistory.load(runs["hash"][0]).choices(1)
    assert (table == table[0]).all() and len(np.unique(table[0])) == 4
    switch = [p["layers"][0]["changed_fraction"] for p in probes(runs["switch"][1])][1:]
    assert max(switch) > 0.01, switch
    curve = json.loads((runs["switch"][0] / PROBE_DIR / CURVE).read_text())["layers"][0]
    assert curve["view"] == "routed" and curve["curve"][0] > 1.0


def _a_function_of_the_token_id(tokens, experts) -> bool:
    """True when equal token ids always got the same expert (fails if the gather scrambled positions)."""
    first = {}
    return all(first.setdefault(int(t), int(e)) == int(e) for t, e in zip(tokens, experts))


@pytest.mark.parametrize("layout", [{"--tensor-model-parallel-size": 2, "--sequence-parallel": True},
                                    {"--pipeline-model-parallel-size": 2}], ids=["tp2-sp", "pp2"])
def test_probe_is_assembled_correctly_under_parallel_layouts(data, runs, tmp_path, layout):
    """Sequence shards (TP+SP) and MoE layers on a pipeline stage other than the last rank's (PP2)."""
    run(data, tmp_path, world=2, **layout)
    single, parallel = ProbeHistory.load(runs["stablemoe"][0]), ProbeHistory.load(tmp_path)
    assert parallel.layout == single.layout and np.array_equal(parallel.tokens, single.tokens)
    assert parallel.iterations.tolist() == [4, 8, 12, 16, 20]
    distilled, routed = parallel.choices(1, "distilled"), parallel.choices(1, "routed")
    # the word-embedding distilled router and stage-2 routing depend on the token id alone
    assert all(_a_function_of_the_token_id(parallel.tokens, row) for row in distilled)
    assert all(_a_function_of_the_token_id(parallel.tokens, row) for row in routed[2:])
    # stage 1: the backbone's choice depends on the context; the probe routes with the distilled
    # router (--moe-eval-routing distilled, the default)
    assert not _a_function_of_the_token_id(parallel.tokens, parallel.choices(1, "backbone")[0])
    assert np.array_equal(routed[0], distilled[0])
    assert np.array_equal(routed[2], distilled[1])
    if "--tensor-model-parallel-size" in layout:  # same initial weights as one process (PP draws them per stage)
        for view in ("routed", "backbone", "distilled"):
            agree = np.mean(parallel.choices(1, view) == single.choices(1, view))
            assert agree >= 0.99, (view, agree)   # only float sums differ


def test_history_survives_resume_and_drops_newer_probes(data, tmp_path):
    save = tmp_path / "ckpt"
    run(data, tmp_path, **{"--save": save, "--save-interval": 12})
    first = ProbeHistory.load(save)
    before = (first.all_choices().copy(), [r for r in first.records])
    # --save tmp/ckpt beside --metrics-file tmp/metrics.jsonl: the report names and writes under tmp
    assert locate_history(save).run_dir == tmp_path and locate_history(save / PROBE_DIR).name == tmp_path.name
    # resume from iteration 12 into the same directory: the probes at 16 and 20 are dropped, then redone
    records, log = run(data, tmp_path / "again", **{"--save": save, "--load": save / "iter_0000012"})
    assert f"routing probe history {save / PROBE_DIR}: kept 3 probes up to iteration 12, dropped 2 newer" in log
    assert [p["iteration"] for p in probes(records)] == [16, 20]
    after = ProbeHistory.load(save)
    assert after.records == before[1]                 # the resumed run continues the changed fractions
    assert np.array_equal(after.all_choices(), before[0])   # bitwise resume: the same routing


def test_report_on_real_runs(runs, tmp_path):
    from stablemoe_megatron.cli.routing_report import main

    dirs = [str(runs[r][0]) for r in ("stablemoe", "hash", "switch")]
    assert main(dirs + ["--output", str(tmp_path), "--labels", "StableMoE", "Hash", "Switch", "--top-k", "5"]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["agreement.png", "fluctuation.png", "load_Hash.png", "load_StableMoE.png", "load_Switch.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / p).stat().st_size > 5000
               for p in pngs)
    text = (tmp_path / "report.md").read_text()
    assert "| Hash | 1 | routed | 0.0 | 0.0 | 0.0 |" in text
    assert "| StableMoE | 1 | routed |" in text and "| Switch | 1 | routed |" in text
    for name in ("StableMoE", "Hash", "Switch"):
        section = text.split(f"### {name}, layer 1 (routing at iteration 20)")[1].split("###")[0]
        rows = [line.split("|") for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == 4 and sum(int(r[2]) for r in rows) == TOKENS
        assert "▁" in section   # SentencePiece pieces, decoded through the run's tokenizer
