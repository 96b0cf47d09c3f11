"""What a cluster does to a job: SIGTERM to the launcher (time limit, scancel) makes the workers save and
exit; a kill -9 of the launcher (out-of-memory, lost shell) does not leave the workers running on their own."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from stablemoe_megatron.runtime import free_port
from stablemoe_megatron.training.signals import LauncherWatch, StopSignals
from trainer_cases import tiny_flags, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("signals_data"))


def _torchrun(data, tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = tiny_flags(data, **{"--train-iters": 100000, "--save": save, "--metrics-file": metrics,
                               "--expert-model-parallel-size": 2, "--moe-stage2-start-iter": 2})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "stablemoe_megatron.train", *map(str, argv)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()[-3000:]
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(json.loads(line).get("iteration", 0) >= 3 for line in lines if line.endswith("}")):
            break
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len([w for w in workers if "stablemoe_megatron.train" in " ".join(w.cmdline())]) == 2
    return proc, workers, save, tmp_path / "out.log"


def _check_resumable(data, save: Path) -> int:
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    argv = tiny_flags(data, **{"--train-iters": latest + 1, "--save": save, "--load": save,
                               "--expert-model-parallel-size": 2, "--moe-stage2-start-iter": 2})
    assert run_distributed(train, 2, args=(argv,))[-1][0]["iteration"] == latest + 1
    return latest


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_exits(data, tmp_path):
    proc, workers, save, log = _torchrun(data, tmp_path)
    proc.send_signal(signal.SIGTERM)  # what scancel / the time limit sends
    proc.wait(timeout=120)
    psutil.wait_procs(workers, timeout=30)
    output = log.read_text()
    assert "(signal SIGTERM)" in output, output[-3000:]
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert _check_resumable(data, save) >= 3


@pytest.mark.slow
def test_workers_save_and_exit_when_torchrun_is_killed(data, tmp_path):
    proc, workers, save, log = _torchrun(data, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # only the launcher, as the out-of-memory killer would
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=90)
    assert not alive, f"workers still running after their launcher died: {[w.pid for w in alive]}"
    output = log.read_text()
    assert "is gone: saving and exiting" in output and "(signal SIGTERM)" in output, output[-3000:]
    assert _check_resumable(data, save) >= 3


def test_stop_signals_flag_and_restore():
    previous = signal.getsignal(signal.SIGTERM)
    stops = StopSignals()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stops.received == "SIGTERM"
    stops.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_launcher_watch_only_under_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert LauncherWatch.start_if_launched() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    watch = LauncherWatch.start_if_launched()
    assert watch is not None and watch.parent == os.getppid()
    watch.stop()
