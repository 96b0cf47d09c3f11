"""Bad input stops the trainer before any work with one message naming the flag (exit code 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import tiny_flags, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("errors_data"))


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt_run")
    run_distributed(train, 1, args=(tiny_flags(data, **{"--train-iters": 2, "--moe-stage2-start-iter": 1, "--save": run_dir}),))
    return run_dir


def _main(argv, monkeypatch, capsys, world=1):
    from stablemoe_megatron.train import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


CASES = {
    "world-not-divisible-by-tp-pp": (3, {"--tensor-model-parallel-size": 2, "--sequence-parallel": True},
                                     "--tensor-model-parallel-size"),
    "experts-not-divisible-by-ep": (2, {"--num-experts": 3, "--expert-model-parallel-size": 2},
                                    "--expert-model-parallel-size"),
    "heads-not-divisible-by-tp": (4, {"--num-attention-heads": 2, "--hidden-size": 32,
                                      "--tensor-model-parallel-size": 4, "--sequence-parallel": True},
                                  "--num-attention-heads"),
    "stage2-beyond-train-iters": (1, {"--moe-stage2-start-iter": 50}, "--moe-stage2-start-iter"),
    "missing-data": (1, {"--data-path": "/nonexistent/prefix"}, "--data-path"),
    "missing-tokenizer": (1, {"--tokenizer-model": "/nonexistent/spm.model"}, "--tokenizer-model"),
    "moe-tp-without-sp": (2, {"--tensor-model-parallel-size": 2}, "--sequence-parallel"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_flags(name, data, monkeypatch, capsys):
    world, overrides, flag = CASES[name]
    code, err = _main(tiny_flags(data, **overrides), monkeypatch, capsys, world)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("flag,value", [("--moe-router", "switch"), ("--hidden-size", 64),
                                        ("--num-experts", 8)])
def test_resume_with_another_model(flag, value, data, checkpoint, monkeypatch, capsys):
    overrides = {"--load": checkpoint, flag: value}
    if flag == "--moe-router":
        overrides["--moe-stage2-start-iter"] = False  # switch has no distilled router by default
    code, err = _main(tiny_flags(data, **overrides), monkeypatch, capsys)
    assert code == 2 and flag in err and "holds a different model" in err, err


def test_tokenizer_larger_than_the_checkpoints_model(data, checkpoint, tmp_path, monkeypatch, capsys):
    from stablemoe_megatron.cli.train_tokenizer import main as train_tokenizer

    corpus = Path(__file__).resolve().parents[1] / "data" / "corpus" / "valid.jsonl"
    train_tokenizer(["--input", str(corpus), "--model-prefix", str(tmp_path / "big"), "--vocab-size", "800"])
    code, err = _main(tiny_flags(data, **{"--load": checkpoint, "--tokenizer-model": tmp_path / "big.model"}),
                      monkeypatch, capsys)
    assert code == 2 and "--tokenizer-model" in err and "800" in err, err


def test_data_tokenized_with_a_larger_vocabulary(data, tmp_path, monkeypatch, capsys):
    from stablemoe_megatron.cli.train_tokenizer import main as train_tokenizer

    corpus = Path(__file__).resolve().parents[1] / "data" / "corpus" / "valid.jsonl"
    train_tokenizer(["--input", str(corpus), "--model-prefix", str(tmp_path / "small"), "--vocab-size", "400"])
    code, err = _main(tiny_flags(data, **{"--tokenizer-model": tmp_path / "small.model"}), monkeypatch, capsys)
    assert code == 2 and "vocabulary" in err, err


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path):
    """A subprocess, as a user runs it: exit code 1, a message, no save after the bad step."""
    ckpt = tmp_path / "ckpt"
    argv = tiny_flags(data, **{"--lr": 1e30, "--lr-warmup-iters": 0, "--clip-grad": 0, "--save": ckpt,
                               "--save-interval": 1, "--train-iters": 20})
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29900 + os.getpid() % 90), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "stablemoe_megatron.train", *map(str, argv)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "NaN or infinite" in out.stdout and "Traceback" not in out.stderr
    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    saved = sorted(p.name for p in ckpt.glob("iter_*"))
    assert saved[-1] == f"iter_{latest:07d}" and latest < 20
