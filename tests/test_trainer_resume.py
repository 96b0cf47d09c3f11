"""Checkpoints: a run stopped at iteration k and resumed reproduces the uninterrupted run's losses
bitwise (also across the stage switch), a kill during a save leaves the last checkpoint loadable,
and a checkpoint reloads under another parallel layout with the same validation loss."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import losses_by_iteration, tiny_flags, train

ITERS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("resume_data"))


def _flags(data, run_dir: Path, name: str, **extra):
    return tiny_flags(data, **{"--train-iters": ITERS, "--save": run_dir / "ckpt", "--load": run_dir / "ckpt",
                               "--save-interval": 4, "--metrics-file": run_dir / f"{name}.jsonl",
                               "--eval-interval": 8, **extra})


def _run(argv, world, **parallel):
    return run_distributed(train, world, args=(argv,), **parallel)[-1]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    (run_dir / "ckpt").mkdir()
    results, records = _run(_flags(data, run_dir, "full"), 1)
    return losses_by_iteration(records), results, run_dir


@pytest.mark.parametrize("stop_at", [4, 12], ids=["resume-before-switch", "resume-after-switch"])
def test_resumed_run_reproduces_losses_bitwise(data, tmp_path, uninterrupted, stop_at):
    reference, ref_results, _ = uninterrupted
    (tmp_path / "ckpt").mkdir()
    first, _ = _run(_flags(data, tmp_path, "first", **{"--exit-interval": stop_at}), 1)
    assert first["iteration"] == stop_at and first["exited_early"]
    results, records = _run(_flags(data, tmp_path, "second"), 1)
    resumed = losses_by_iteration(records)
    assert sorted(resumed) == list(range(stop_at + 1, ITERS + 1))
    for iteration, loss in resumed.items():
        assert loss == reference[iteration], (iteration, loss, reference[iteration])
    stages = {r["iteration"]: r["stage"] for r in records if "stage" in r}
    assert stages[ITERS] == 2
    assert results["validation_loss"] == ref_results["validation_loss"]


def test_resume_with_dropout_reproduces_losses_bitwise(data, tmp_path):
    """Megatron-LM's default dropout 0.1: the resumed run draws the same dropout masks (a data
    loader started at the resume once took a seed from the global RNG and shifted them)."""
    drop = {"--hidden-dropout": 0.1, "--attention-dropout": 0.1, "--train-iters": 8, "--save-interval": 4}
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    for d in (full_dir, part_dir):
        (d / "ckpt").mkdir(parents=True)
    _, records = _run(_flags(data, full_dir, "full", **drop), 1)
    reference = losses_by_iteration(records)
    _run(_flags(data, part_dir, "first", **drop, **{"--exit-interval": 4}), 1)
    _, records = _run(_flags(data, part_dir, "second", **drop), 1)
    resumed = losses_by_iteration(records)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[i] == reference[i] for i in resumed), (resumed, reference)


EP2_CASES = {
    # StableMoE with the default flags, stopped at the stage switch
    "stablemoe-resume-at-switch": ({}, 8),
    # BASE solves its balanced assignment over the rows a rank receives from the shuffle: the
    # permutations decide the routing (greedy routers only show them in the losses' last bits)
    "base-resume-at-4": ({"--moe-router": "base", "--moe-stage2-start-iter": False}, 4),
}


@pytest.mark.parametrize("name", sorted(EP2_CASES))
def test_resume_with_expert_parallel_2(data, tmp_path, name):
    """Two data-parallel ranks with the default token shuffle, which sends tokens between them (a
    real all-to-all); its permutations are seeded per iteration (MoEHost.start_moe_step), so the
    resumed run draws the uninterrupted run's and reproduces its losses bitwise."""
    from stablemoe_megatron.cli_args import parse_config

    extra, stop_at = EP2_CASES[name]
    extra = {"--expert-model-parallel-size": 2, **extra}
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    for d in (full_dir, part_dir):
        (d / "ckpt").mkdir(parents=True)
    config = parse_config(_flags(data, full_dir, "full", **extra))
    assert config.moe.shuffles_tokens and config.data_parallel_size(2) == 2
    _, full_records = _run(_flags(data, full_dir, "full", **extra), 2)
    first, _ = _run(_flags(data, part_dir, "first", **extra, **{"--exit-interval": stop_at}), 2)
    assert first["iteration"] == stop_at and first["exited_early"]
    _, records = _run(_flags(data, part_dir, "second", **extra), 2)
    reference, resumed = losses_by_iteration(full_records), losses_by_iteration(records)
    assert sorted(resumed) == list(range(stop_at + 1, ITERS + 1))
    for iteration, loss in resumed.items():
        assert loss == reference[iteration], (iteration, loss, reference[iteration])


def _eval(load, world, extra_flags, data):
    from stablemoe_megatron.evaluate import run

    argv = ["--load", str(load), "--eval-iters", "2", "--tokenizer-model", data["tokenizer_model"], *extra_flags]
    return run(argv)["loss"]


@pytest.mark.parametrize("world,flags", [
    (1, []), (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--pipeline-model-parallel-size", "2"]), (2, ["--expert-model-parallel-size", "2"]),
], ids=["world1", "tp2", "pp2", "ep2"])
def test_checkpoint_reloads_under_another_layout_with_the_same_loss(data, uninterrupted, world, flags):
    _, _, run_dir = uninterrupted
    reference = run_distributed(_eval, 1, args=(run_dir / "ckpt", 1, [], data))[0]
    losses = run_distributed(_eval, world, args=(run_dir / "ckpt", world, flags, data))
    for loss in losses:
        assert abs(loss - reference) < 1e-5, (flags, loss, reference)


def test_kill_during_saves_leaves_the_last_checkpoint_loadable(data, tmp_path):
    """SIGKILL a run that saves every iteration at several moments; the tracker always names a
    complete checkpoint that loads (the run may have been killed in the middle of a save)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    argv = _flags(data, tmp_path, "killed", **{"--save-interval": 1, "--train-iters": 200})
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29600 + os.getpid() % 300), PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "stablemoe_megatron.train", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    while time.time() < deadline and not (tracker.exists() and int(tracker.read_text()) >= 3):
        time.sleep(0.05)
    time.sleep(0.37)  # somewhere inside a later iteration or save
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its checkpoint helpers, like a lost node
    proc.wait(timeout=30)
    latest = int(tracker.read_text())
    assert latest >= 3
    leftovers = [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert all(name.startswith("iter_") for name in leftovers)
    loss = run_distributed(_eval, 1, args=(ckpt, 1, [], data))[0]
    assert loss == loss and loss < 20  # finite
