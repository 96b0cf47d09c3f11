"""The seeded reproduction: statistics over seeds against numpy, metrics of a resumed run, the
driver's reuse / resume / changed-settings rules, its recipe and ablation flags, and
``--eval-moe-bypass`` (the MoE block skipped at evaluation) against a model whose block is removed."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stablemoe_megatron.analysis.seeds import RunSummary, Spread, aggregate, mean_band, read_run
from stablemoe_megatron.cli import reproduce
from stablemoe_megatron.cli_args import parse_config
from stablemoe_megatron.errors import ConfigError
from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import tiny_flags, train


def test_spread_and_paired_differences_match_numpy():
    rng = np.random.default_rng(0)
    values = {name: rng.normal(100, 5, size=3) for name in ("stablemoe", "dense", "hash")}
    runs = {name: {seed: RunSummary(valid_ppl=float(v)) for seed, v in zip((1, 2, 3), vals)}
            for name, vals in values.items()}
    runs["hash"].pop(3)  # a missing seed: paired over the seeds both have
    stats = aggregate(runs, "stablemoe", ["valid_ppl"])
    assert stats["dense"]["valid_ppl"].mean == pytest.approx(values["dense"].mean())
    assert stats["dense"]["valid_ppl"].std == pytest.approx(values["dense"].std(ddof=1))
    diff = values["dense"] - values["stablemoe"]
    paired = stats["dense"]["vs_stablemoe:valid_ppl"]
    assert (paired.mean, paired.std, paired.n) == (pytest.approx(diff.mean()), pytest.approx(diff.std(ddof=1)), 3)
    assert paired.sigmas() == pytest.approx(diff.mean() / diff.std(ddof=1))
    hash_diff = (values["hash"] - values["stablemoe"])[:2]
    assert stats["hash"]["vs_stablemoe:valid_ppl"].mean == pytest.approx(hash_diff.mean())
    assert stats["hash"]["seeds"] == [1, 2] and "vs_stablemoe:valid_ppl" not in stats["stablemoe"]
    assert Spread.of([2.0]).format() == "2.00" and Spread.of([]).format() == "-"
    assert Spread.of([1.0, -3.0]).format("{:+.1f}") == "-1.0 ± 2.8"
    xs, means, stds = mean_band([[(0, 1.0), (10, 3.0)], [(0, 3.0), (10, 5.0), (20, 9.0)]])
    assert (xs, means) == ([0, 10], [2.0, 4.0]) and stds == pytest.approx([2 ** 0.5] * 2)


def _write_metrics(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn": ')


def test_read_run_keeps_the_last_record_of_a_resumed_iteration(tmp_path):
    step = lambda it, loss, ms: {"iteration": it, "lm_loss": loss, "elapsed_ms": ms, "tokens_per_sec": 1000.0 / ms,  # noqa: E731
                                 "moe_layers": {"2": {"mean_gate": it / 100, "load_cv": 0.1}}}
    records = [step(10, 5.0, 100.0), step(20, 4.0, 200.0), {"iteration": 20, "split": "validation", "val_ppl": 60.0},
               step(30, 9.9, 999.0),  # the interrupted attempt's iteration 30, repeated after the resume
               step(30, 3.5, 100.0), step(40, 3.0, 100.0),
               {"iteration": 40, "split": "validation", "val_ppl": 40.0},
               {"iteration": 40, "split": "validation_moe_bypassed", "val_ppl": 45.0},
               {"iteration": 40, "split": "test", "val_ppl": 42.0},
               {"routing_probe": {"iteration": 20, "layers": [{"changed_fraction": 0.5, "distill_agreement": 0.6}]}},
               {"routing_probe": {"iteration": 40, "layers": [{"changed_fraction": 0.1, "distill_agreement": 0.9}]}}]
    _write_metrics(tmp_path / "m.jsonl", records)
    run = read_run(tmp_path / "m.jsonl", tokens_per_iteration=4096)
    assert run.train_loss_curve == [(10, 5.0), (20, 4.0), (30, 3.5), (40, 3.0)]
    assert run.train_seconds == pytest.approx(1.0 + 2.0 + 1.0 + 1.0)  # elapsed_ms x iterations since the last record
    assert run.valid_curve == [(20 * 4096, 60.0), (40 * 4096, 40.0)]
    assert run.valid_time_curve == [(pytest.approx(3.0), 60.0), (pytest.approx(5.0), 40.0)]
    assert (run.valid_ppl, run.test_ppl, run.valid_ppl_moe_bypassed) == (40.0, 42.0, 45.0)
    assert run.layer_curves["mean_gate"][-1] == (40, 0.4)
    assert run.probe_curves["distill_agreement"] == [(20, 0.6), (40, 0.9)]


def _args(tmp_path, *extra):
    return reproduce.build_parser().parse_args(["--data-dir", str(tmp_path / "data"), "--train-iters", "60", *extra])


def test_recipe_and_ablation_flags_resolve_as_documented(tmp_path):
    args = _args(tmp_path)
    config = lambda name: parse_config(reproduce.train_flags(name, tmp_path / name, args, seed=2))  # noqa: E731
    stage1, previous, dense_previous = config("stablemoe-stage1"), config("s1-previous"), config("dense-previous")
    assert (stage1.model.activation, stage1.optimizer.weight_decay, stage1.moe.expert_output_init) == ("relu", 0.0, "zero")
    assert (stage1.moe.distill_loss_coeff, stage1.moe.eval_routing, stage1.moe.expert_capacity_factor) == (0.3, "distilled", 2.0)
    assert stage1.training.seed == 2 and stage1.logging.eval_moe_bypass and stage1.moe.stage2_start_iter is None
    assert (previous.model.activation, previous.moe.centroid_init, previous.moe.distill_loss_coeff) == ("gelu", "normal", 1.0)
    assert not dense_previous.moe.enabled and dense_previous.model.activation == "gelu"
    assert config("stablemoe-25").moe.stage2_start_iter == 15 and config("stablemoe").moe.stage2_start_iter == 6
    assert config("switch").moe.expert_capacity_factor is None and config("dense-ffn").moe.num_experts == 1
    old = parse_config(reproduce.train_flags("stablemoe", tmp_path / "x", _args(tmp_path, "--recipe", "previous")))
    assert (old.model.activation, old.moe.expert_output_init, old.moe.distill_loss_coeff) == ("gelu", "normal", 1.0)
    assert (old.moe.shuffles_tokens, old.moe.balance_count_scope, old.moe.effective_capacity_factor) == (False, "micro-batch", 4.0)
    previous_all = config("s1-previous-all")
    assert (previous_all.moe.distill_teacher, previous_all.moe.expert_capacity_factor) == ("assignment", 4.0)


class FakeTrainer:
    """Stands in for subprocess.run: records the command, writes a finished run's test record."""

    def __init__(self):
        self.commands = []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        metrics = Path(command[command.index("--metrics-file") + 1])
        with open(metrics, "a") as f:
            f.write(json.dumps({"iteration": 60, "split": "test", "val_ppl": 50.0}) + "\n")
        return type("Done", (), {"returncode": 0})()


def test_driver_reuses_resumes_and_refuses_changed_settings(tmp_path, monkeypatch):
    fake = FakeTrainer()
    monkeypatch.setattr(reproduce.subprocess, "run", fake)
    args, run_dir = _args(tmp_path), tmp_path / "out" / "hash" / "seed1"
    reproduce.run_variant("hash", 1, run_dir, args, log=lambda *_: None)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["flags"] == reproduce.train_flags("hash", run_dir, args, 1) and len(fake.commands) == 1
    assert reproduce.run_variant("hash", 1, run_dir, args, log=lambda *_: None)["reused"] and len(fake.commands) == 1
    # an interrupted attempt with a checkpoint: resumed in place (nothing deleted), same flags
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 10, "lm_loss": 5.0}) + "\n")
    (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10")
    (run_dir / "checkpoints" / "iter_0000010").mkdir()
    reproduce.run_variant("hash", 1, run_dir, args, log=lambda *_: None)
    assert fake.commands[-1][-len(meta["flags"]):] == meta["flags"] and len(fake.commands) == 2
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["iteration"] == 10
    assert not (run_dir / "checkpoints" / "iter_0000010").exists()  # dropped once finished (no --keep-checkpoints)
    with pytest.raises(reproduce.SettingsChanged, match=r"holds a run made with other settings .*"
                                                        r"use another --output, or --fresh"):
        reproduce.run_variant("hash", 1, run_dir, _args(tmp_path, "--eval-iters", "3"), log=lambda *_: None)
    assert len(fake.commands) == 2


# --------------------------------------------------------------------------------------------------
def _bypass_matches_removed_block():
    """Worker: logits with bypass_moe_blocks == logits with each MoE block's output replaced by 0."""
    import moe_cases
    from stablemoe_megatron.moe.block import TransformerLayerWithMoEBlock, bypass_moe_blocks

    torch.manual_seed(0)
    model = moe_cases.build(moe_options={"expert_output_init": "normal"}).eval()
    tokens, _ = moe_cases.batch(0)
    with torch.no_grad():
        full = model(tokens, moe_cases.positions(), None)
        with bypass_moe_blocks([model]) as count:
            bypassed = model(tokens, moe_cases.positions(), None)
        layers = [m for m in model.modules() if isinstance(m, TransformerLayerWithMoEBlock)]
        for layer in layers:
            layer.moe_block.forward = lambda h: (torch.zeros_like(h), None)
        removed = model(tokens, moe_cases.positions(), None)
    return count, (bypassed - removed).abs().max().item(), (full - removed).abs().max().item()


def test_bypass_equals_a_model_without_its_moe_block():
    count, bypass_error, full_difference = run_distributed(_bypass_matches_removed_block, 1)[0]
    assert count == 1 and bypass_error == 0.0 and full_difference > 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("bypass_data"))


def test_trainer_logs_the_moe_bypassed_validation(data, tmp_path):
    argv = tiny_flags(data, **{"--train-iters": 4, "--eval-interval": 2, "--eval-moe-bypass": True, "--moe-stage2-start-iter": 2,
                               "--metrics-file": tmp_path / "m.jsonl"})
    _, records = run_distributed(train, 1, args=(argv,))[0]
    evals = {(r["split"], r["iteration"]): r["val_loss"] for r in records if "split" in r}
    assert {k for k in evals if k[0] == "validation_moe_bypassed"} == {("validation_moe_bypassed", 2),
                                                                      ("validation_moe_bypassed", 4)}
    assert all(evals[("validation_moe_bypassed", i)] != evals[("validation", i)] for i in (2, 4))
    with pytest.raises(ConfigError, match=r"^--eval-moe-bypass skips the paper-layout MoE blocks; this model has "
                                          r"none \(dense, or --moe-layer-freq puts the experts in the MLPs\): "
                                          r"drop --eval-moe-bypass$"):
        parse_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                      "--train-iters", "4", "--data-path", str(data["prefix"]), "--eval-moe-bypass"]).validate(1)


def test_moe_input_statistics_against_numpy():
    from stablemoe_megatron.moe.layer import input_statistics

    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(5, 3, 8)) + rng.normal(size=8)  # a common offset shared by every token
    weight = rng.normal(size=(4, 8))
    stats = input_statistics(torch.tensor(hidden, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32))
    rows = hidden.reshape(-1, 8)
    assert stats["input_rms"].item() == pytest.approx(np.sqrt((rows ** 2).mean()), rel=1e-5)
    shared = (rows.mean(0) ** 2).sum() / (rows ** 2).sum(1).mean()
    assert stats["input_shared_fraction"].item() == pytest.approx(shared, rel=1e-5) and 0 < shared < 1
    assert stats["centroid_norm"].item() == pytest.approx(np.linalg.norm(weight, axis=1).mean(), rel=1e-5)
    same = input_statistics(torch.ones(4, 2, 8), None)
    assert same["input_shared_fraction"].item() == pytest.approx(1.0) and "centroid_norm" not in same
