"""convert_checkpoint: export -> import -> eval equals the original; reshard keeps every tensor and the
loss; converted checkpoints resume with --no-load-optim; inspect's counts; one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablemoe_megatron.cli.convert_checkpoint import main
from stablemoe_megatron.export.convert import import_rank, reshard_rank
from stablemoe_megatron.export.dist_reader import TorchDistCheckpoint
from stablemoe_megatron.export.exporter import export_checkpoint
from stablemoe_megatron.export.summary import describe
from distributed import run_distributed
from test_convert_helpers import evaluate, model_tensors, trained_checkpoint

REPO = Path(__file__).resolve().parents[1]
EVAL = ["--eval-iters", "2", "--micro-batch-size", "4", "--global-batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    info = trained_checkpoint(tmp_path_factory)
    # the original, evaluated as trained (2 ranks, EP 2)
    info["loss"] = run_distributed(evaluate, 2, ep=2, args=(["--load", info["run"], *EVAL,
                                                             "--expert-model-parallel-size", "2"],))[0]["loss"]
    return info


def _assert_same_tensors(a, b):
    first, second = model_tensors(a), model_tensors(b)
    assert sorted(first) == sorted(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _assert_same_position(source, converted, layout):
    old, new = TorchDistCheckpoint(source).state, TorchDistCheckpoint(converted).state
    assert (new.iteration, new.consumed_train_samples, new.stage) == (old.iteration, old.consumed_train_samples, 2)
    assert new.layout["model_only"] and (new.layout["tp"], new.layout["pp"], new.layout["ep"]) == layout


def test_export_import_eval_equals_original(trained, tmp_path):
    export_checkpoint(trained["run"], tmp_path / "export", log=lambda _: None)
    out = str(tmp_path / "imported")
    run_distributed(import_rank, 2, pp=2, args=(str(tmp_path / "export"), out, 1, 2, 1))
    _assert_same_tensors(trained["run"], out)
    _assert_same_position(trained["run"], out, (1, 2, 1))
    loss = run_distributed(evaluate, 2, pp=2, args=(["--load", out, *EVAL, "--pipeline-model-parallel-size", "2"],))
    assert loss[0]["loss"] == pytest.approx(trained["loss"], abs=1e-6)
    assert loss[0]["stage"] == 2


def test_reshard_keeps_every_tensor_and_the_loss(trained, tmp_path):
    out = str(tmp_path / "tp2")
    run_distributed(reshard_rank, 2, tp=2, args=(trained["run"], out, 2, 1, 1))
    _assert_same_tensors(trained["run"], out)
    _assert_same_position(trained["run"], out, (2, 1, 1))
    assert not TorchDistCheckpoint(out).has_optimizer_state()
    saved = TorchDistCheckpoint(out).config.parallel
    assert saved.tensor_model_parallel_size == 2 and saved.sequence_parallel
    loss = run_distributed(evaluate, 2, tp=2, args=(["--load", out, *EVAL, "--tensor-model-parallel-size", "2",
                                                     "--sequence-parallel"],))
    assert loss[0]["loss"] == pytest.approx(trained["loss"], abs=1e-6)


def _resume(argv):
    """Train from ``argv`` in a worker; a user error comes back as its message (keeps the pool alive)."""
    from trainer_cases import train

    from stablemoe_megatron.errors import ConfigError

    try:
        return train(argv)[0]
    except ConfigError as exc:
        return str(exc)


def test_converted_checkpoint_resumes_with_no_load_optim(trained, tmp_path):
    from trainer_cases import tiny_flags

    out = str(tmp_path / "world1")
    run_distributed(reshard_rank, 1, args=(trained["run"], out, 1, 1, 1))
    argv = tiny_flags(trained["data"], **{"--train-iters": 10, "--moe-stage2-start-iter": 4, "--load": out,
                                          "--moe-sublayers-per-expert": 2, "--log-interval": 1})
    assert "--no-load-optim" in run_distributed(_resume, 1, args=(argv,))[0]
    results = run_distributed(_resume, 1, args=(argv + ["--no-load-optim"],))[0]
    assert results["iteration"] == 10 and not results["exited_early"]


def test_inspect_reports_layout_stage_and_parameter_counts(trained, capsys):
    info = describe(trained["run"])
    assert info["iteration"] == 8 and info["stage"] == 2 and info["layout"]["ep"] == 2
    assert info["iterations_in_run"] == [2, 4, 6, 8] and info["optimizer_state"]
    d, f, n, layers, vocab, sublayers = 32, 128, 4, 2, 512, 2
    assert info["parameters"]["expert"] == sublayers * n * (2 * f * d + 2 * d)  # FFNs + per-expert LayerNorms
    assert info["parameters"]["router"] == n * d and info["parameters"]["distilled"] == vocab * 50 + n * 50
    per_layer = 4 * d * d + 2 * f * d + 4 * d  # attention, MLP, two LayerNorms
    assert info["parameters"]["shared"] == vocab * d + 32 * d + layers * per_layer + 2 * d
    assert main(["inspect", trained["run"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == info["parameters"]
    assert main(["inspect", str(Path(trained["run"]) / "iter_0000004")]) == 0
    text = capsys.readouterr().out
    assert "iteration       4 (stage 1" in text and "params expert" in text


def test_bad_input_is_one_line_exit_2(trained, tmp_path, capsys):
    export_dir = tmp_path / "export"
    export_checkpoint(trained["run"], export_dir, log=lambda _: None)
    cases = [
        (["inspect", str(tmp_path / "missing")], "no such checkpoint directory"),
        (["export", trained["run"], str(export_dir)], "exists"),
        (["import", str(export_dir), str(tmp_path / "x"), "--ep", "3"], "--ep 3"),
        (["import", trained["run"], str(tmp_path / "x")], "not an exported model"),
        (["reshard", trained["run"], trained["run"]], "new directory"),
        (["reshard", trained["run"], str(tmp_path / "x"), "--tp", "0"], "--tp must be >= 1"),
        (["export", trained["run"], str(tmp_path / "y"), "--tokenizer-model", str(tmp_path / "nope")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("convert_checkpoint: error:") and message in err and "\n" not in err, (argv, err)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "inspect",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_command_line_import_and_reshard_start_their_own_processes(trained, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    commands = [["export", trained["run"], str(tmp_path / "export")],
                ["import", str(tmp_path / "export"), str(tmp_path / "ep2"), "--ep", "2"],
                ["reshard", str(tmp_path / "ep2"), str(tmp_path / "tp2pp2"), "--tp", "2", "--pp", "2"]]
    for command in commands:
        done = subprocess.run(tool + command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_tensors(trained["run"], tmp_path / "tp2pp2")
    assert (TorchDistCheckpoint(tmp_path / "tp2pp2").state.layout["tp"], ) == (2,)
