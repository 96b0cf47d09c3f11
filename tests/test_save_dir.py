"""Nothing lost: a --save directory has one owner, a run never silently starts over existing checkpoints,
a missing tracker is recovered, a rejected resume writes nothing, and a failed save keeps the last one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import tiny_dataset
from stablemoe_megatron.errors import ConfigError
from distributed import run_distributed
from stablemoe_megatron.training.save_dir import SaveDirLock
from trainer_cases import tiny_flags, train

REPO = Path(__file__).resolve().parents[1]
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("save_dir_data"))


def _flags(data, **overrides) -> list:
    """tiny_flags with the stage switch at iteration 1 (runs here are short) unless given."""
    return tiny_flags(data, **{"--moe-stage2-start-iter": 1, **overrides})


def _env(port_offset: int = 0) -> dict:
    return dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", PYTHONPATH=str(REPO),
                MASTER_PORT=str(28000 + (os.getpid() * 7 + port_offset) % 900), PYTHONWARNINGS="ignore")


def _trainer(argv, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "stablemoe_megatron.train", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _files(directory: Path) -> dict:
    """{relative path: bytes} of every file under ``directory`` (to show nothing changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _try_train(argv):
    """The trainer in a worker; the ConfigError message (every rank raises it) or the records."""
    try:
        return train(argv)
    except ConfigError as exc:
        return f"ConfigError: {exc}"


# -- the lock --------------------------------------------------------------------------------------
def test_lock_names_its_holder_and_is_free_again_after_release(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = SaveDirLock.acquire(tmp_path)
    with pytest.raises(ConfigError) as err:
        SaveDirLock.acquire(tmp_path)
    message = str(err.value)
    assert f"--save {tmp_path} is in use by another run (pid {os.getpid()} on " in message
    assert "Slurm job 4242" in message and "choose another --save" in message
    first.release()
    SaveDirLock.acquire(tmp_path).release()


def test_unwritable_save_directory_is_one_message(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = _flags(data, **{"--save": blocker / "ckpt", "--train-iters": 2})
    out = subprocess.run([sys.executable, "-m", "stablemoe_megatron.train", *map(str, argv)], env=_env(1),
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith(f"stablemoe-train: error: --save {blocker / 'ckpt'}: cannot create"), lines


@pytest.mark.slow
def test_second_run_on_the_same_save_stops_and_a_killed_holder_frees_it(data, tmp_path):
    """Two processes on one --save: the second stops at once naming the first; kill -9 of the
    first releases the lock (no stale lock), and a third run resumes its checkpoints."""
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    save.mkdir()
    argv = _flags(data, **{"--train-iters": 100000, "--save": save, "--load": save, "--save-interval": 2,
                               "--metrics-file": metrics})
    holder = _trainer(argv, _env(2), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (save / TRACKER).is_file():
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()[-2000:]
            time.sleep(0.2)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "stablemoe_megatron.train", *map(str, argv)],
                                env=_env(3), capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert f"is in use by another run (pid {holder.pid} on " in lines[0], lines
        assert time.monotonic() - started < 60 and holder.poll() is None
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)  # like an out-of-memory kill: no clean-up at all
        holder.wait(timeout=30)
    _wait_until_free(save, timeout=60)  # kill -9 leaves no stale lock (a dying child may hold it a moment)
    latest = int((save / TRACKER).read_text())
    third = _flags(data, **{"--train-iters": latest + 1, "--save": save, "--load": save})
    results, _ = run_distributed(train, 1, args=(third,))[0]
    assert results["iteration"] == latest + 1


def _wait_until_free(save, timeout: float) -> None:
    """The lock of ``save`` can be taken within ``timeout`` seconds (no process still holds it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            SaveDirLock.acquire(save).release()
            return
        except ConfigError:
            assert time.monotonic() < deadline, f"--save {save} still locked {timeout:g} s after the holder died"
            time.sleep(0.5)


# -- existing checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory):
    """An EP2 run on 2 ranks with checkpoints at iterations 5 and 10."""
    root = tmp_path_factory.mktemp("saved_run")
    argv = _flags(data, **{"--train-iters": 10, "--save": root / "ckpt", "--save-interval": 5,
                               "--expert-model-parallel-size": 2, "--moe-stage2-start-iter": 4})
    run_distributed(train, 2, args=(argv,))
    return root / "ckpt", argv


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / "run.lock").unlink()
    return dst


def test_missing_tracker_resumes_from_the_newest_complete_checkpoint(data, saved_run, tmp_path):
    save = _copy(saved_run[0], tmp_path / "ckpt")
    (save / TRACKER).unlink()
    (save / "iter_0000015").mkdir()  # an incomplete directory is not a checkpoint
    before = _files(save / "iter_0000005")
    argv = _flags(data, **{"--train-iters": 12, "--save": save, "--load": save, "--save-interval": 5,
                               "--expert-model-parallel-size": 2, "--moe-stage2-start-iter": 4,
                               "--metrics-file": tmp_path / "m.jsonl"})
    outputs = run_distributed(_try_train, 2, args=(argv,))
    records = outputs[-1][1]
    iterations = [r["iteration"] for r in records if "lm_loss" in r]
    assert iterations == [11, 12], iterations
    assert _files(save / "iter_0000005") == before
    assert int((save / TRACKER).read_text()) == 12


@pytest.mark.parametrize("load", [False, True], ids=["no-load", "load-elsewhere"])
def test_run_over_existing_checkpoints_stops_and_touches_nothing(data, saved_run, tmp_path, load):
    save = _copy(saved_run[0], tmp_path / "ckpt")
    (save / TRACKER).unlink()
    before = _files(save)
    other = tmp_path / "other"
    other.mkdir()
    argv = _flags(data, **{"--train-iters": 10, "--save": save, "--load": other if load else None,
                               "--expert-model-parallel-size": 2})
    outputs = run_distributed(_try_train, 2, args=(argv,))
    for message in outputs:
        assert message.startswith(f"ConfigError: --save {save} already holds 2 complete checkpoint(s), newest "
                                  f"iter_0000010"), message
        assert f"pass --load {save}" in message and "--start-fresh" in message
    assert _files(save) == before


def test_start_fresh_moves_the_old_checkpoints_aside(data, saved_run, tmp_path):
    save = _copy(saved_run[0], tmp_path / "ckpt")
    before = _files(save)
    argv = _flags(data, **{"--train-iters": 3, "--save": save, "--load": save, "--start-fresh": True,
                               "--expert-model-parallel-size": 2, "--metrics-file": tmp_path / "m.jsonl"})
    records = run_distributed(_try_train, 2, args=(argv,))[-1][1]
    assert [r["iteration"] for r in records if "lm_loss" in r] == [1, 2, 3]
    moved = [p for p in save.iterdir() if p.name.startswith("superseded_")]
    assert len(moved) == 1
    assert {k: v for k, v in before.items() if k.startswith(("iter_", TRACKER))} == _files(moved[0])
    assert int((save / TRACKER).read_text()) == 3


def test_rejected_resume_leaves_run_config_untouched(data, saved_run, tmp_path):
    save = _copy(saved_run[0], tmp_path / "ckpt")
    before = _files(save)
    argv = _flags(data, **{"--train-iters": 12, "--save": save, "--load": save, "--hidden-size": 64,
                               "--expert-model-parallel-size": 2})
    outputs = run_distributed(_try_train, 2, args=(argv,))
    assert all("holds a different model" in message and "--hidden-size 64" in message for message in outputs)
    assert _files(save) == before


# -- damaged checkpoints ---------------------------------------------------------------------------
def _damage(save: Path, how: str) -> Path:
    newest = save / "iter_0000010"
    if how == "truncated":
        victim = sorted(newest.glob("*.distcp"))[-1]
        victim.write_bytes(victim.read_bytes()[:-100])
        return victim
    if how == "no-metadata":
        (newest / ".metadata").unlink()
        return newest / ".metadata"
    victim = sorted(newest.glob("*.distcp"))[0]
    raw = bytearray(victim.read_bytes())
    raw[: len(raw) // 2] = bytes(len(raw) // 2)  # same size, garbage content
    victim.write_bytes(bytes(raw))
    return victim


@pytest.mark.parametrize("how", ["truncated", "no-metadata", "garbage"])
def test_damaged_newest_checkpoint_is_one_message_with_the_way_back(data, saved_run, tmp_path, how):
    save = _copy(saved_run[0], tmp_path / "ckpt")
    victim = _damage(save, how)
    previous = _files(save / "iter_0000005")
    argv = _flags(data, **{"--train-iters": 12, "--save": save, "--load": save,
                               "--expert-model-parallel-size": 2, "--moe-stage2-start-iter": 4})
    messages = [m for m in run_distributed(_try_train, 2, args=(argv,)) if isinstance(m, str)]
    assert messages, "the damaged checkpoint loaded"
    message = messages[0]
    assert f"checkpoint {save / 'iter_0000010'}" in message and "\n" not in message
    if how != "garbage":
        assert str(victim) in message
    assert f"pass --load {save / 'iter_0000005'}" in message, message
    assert _files(save / "iter_0000005") == previous
    # and the way back works: resume from the previous checkpoint
    argv = _flags(data, **{"--train-iters": 6, "--save": save, "--load": save / "iter_0000005",
                               "--expert-model-parallel-size": 2, "--moe-stage2-start-iter": 4})
    results = run_distributed(_try_train, 2, args=(argv,))[-1][0]
    assert results["iteration"] == 6


@pytest.mark.slow
def test_a_save_that_runs_out_of_space_keeps_the_last_checkpoint(data, tmp_path):
    """Two ranks under torchrun with a file-size limit (what a full disk looks like to a writer)."""
    save = tmp_path / "ckpt"
    first = _flags(data, **{"--train-iters": 3, "--save": save, "--expert-model-parallel-size": 2})
    run_distributed(train, 2, args=(first,))
    before = _files(save / "iter_0000003")
    argv = _flags(data, **{"--train-iters": 6, "--save": save, "--load": save,
                               "--expert-model-parallel-size": 2})
    torchrun = (f"ulimit -f 300; trap '' XFSZ; exec {sys.executable} -m torch.distributed.run --nproc-per-node 2 "
                f"--master-port {_env(5)['MASTER_PORT']} -m stablemoe_megatron.train " + " ".join(map(str, argv)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(["bash", "-c", torchrun], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    stopped = [line for line in out.stderr.splitlines() if line.startswith("stablemoe-train: stopped: saving")]
    assert stopped, out.stderr[-3000:]
    assert f"saving checkpoint iter_0000006 into {save} failed" in stopped[0]
    assert f"the last good checkpoint {save / 'iter_0000003'} is untouched" in stopped[0]
    assert not list(save.glob("*.tmp")) and int((save / TRACKER).read_text()) == 3
    assert _files(save / "iter_0000003") == before
    resumed = _flags(data, **{"--train-iters": 4, "--save": save, "--load": save,
                                  "--expert-model-parallel-size": 2})
    assert run_distributed(train, 2, args=(resumed,))[-1][0]["iteration"] == 4

