"""Preemption on CPU: the trainer receiving SIGUSR1 (Slurm's --signal=USR1@120) saves a checkpoint that
loads, and exits 0; under torchrun with the launcher ignoring USR1 (slurm/launch_node.sh) as well."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from stablemoe_megatron.runtime import free_port
from trainer_cases import tiny_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("preemption_data"))


def _wait_for_iteration(metrics: Path, proc, at_least: int, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the trainer ended before it was signalled"
        if metrics.is_file():
            iterations = [json.loads(line).get("iteration", 0) for line in metrics.read_text().splitlines()
                          if line.strip().endswith("}")]
            if iterations and max(iterations) >= at_least:
                return max(iterations)
        time.sleep(0.2)
    raise AssertionError(f"no iteration {at_least} within {timeout} s")


def _resume(argv):
    from trainer_cases import train

    return train(argv)[0]


def _check_checkpoint_loads(data, save: Path, iteration: int) -> None:
    """The saved iteration is the tracker's, and training resumes from it (optimizer state included)."""
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == iteration
    state = json.loads((save / f"iter_{iteration:07d}" / "train_state.json").read_text())
    assert state["iteration"] == iteration and state["consumed_train_samples"] == 8 * iteration
    assert state["stage"] == 2
    argv = tiny_flags(data, **{"--train-iters": iteration + 1, "--load": save, "--moe-stage2-start-iter": 2})
    results = run_distributed(_resume, 1, args=(argv,))[0]
    assert results["iteration"] == iteration + 1 and not results["exited_early"]


def _start(command, env, **kwargs):
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def test_sigusr1_saves_a_loadable_checkpoint_and_exits_0(data, tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = tiny_flags(data, **{"--train-iters": 100000, "--save": save, "--metrics-file": metrics,
                               "--moe-stage2-start-iter": 2})
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONPATH=str(REPO))
    proc = _start([sys.executable, "-m", "stablemoe_megatron.train", *argv], env)
    _wait_for_iteration(metrics, proc, 3)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    exits = [line for line in output.splitlines() if "exiting at iteration" in line]
    assert len(exits) == 1 and exits[0].endswith("(signal SIGUSR1)"), output[-3000:]
    iteration = int(exits[0].split("exiting at iteration")[1].split()[0])
    assert 3 <= iteration < 100000
    _check_checkpoint_loads(data, save, iteration)


@pytest.mark.slow
def test_sigusr1_to_the_whole_step_under_torchrun(data, tmp_path):
    """What Slurm does: USR1 to every process of the job step (torchrun agent and its workers).

    slurm/launch_node.sh starts torchrun with USR1 ignored (so the agent survives and the workers
    inherit 'ignore' until the trainer installs its handler), and records the signal for requeueing.
    A periodic save comes first: it starts megatron's checkpoint-writer process, which the signal
    reaches too and must survive (it used to die, and the preemption save failed with it).
    """
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    argv = tiny_flags(data, **{"--train-iters": 100000, "--save": save, "--metrics-file": metrics,
                               "--expert-model-parallel-size": 2, "--save-interval": 2})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "stablemoe_megatron.train", *argv]
    env = dict(os.environ, PYTHONPATH=str(REPO), PREEMPT_MARKER=str(tmp_path / "preempted"), OMP_NUM_THREADS="1")
    proc = _start(["bash", str(REPO / "slurm" / "launch_node.sh"), *torchrun], env, start_new_session=True)
    _wait_for_iteration(metrics, proc, 3)
    assert (save / "iter_0000002").is_dir()  # the periodic save ran
    os.killpg(proc.pid, signal.SIGUSR1)  # every process of the "step", like slurmstepd with proctrack/cgroup
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "preempted").is_file()
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 3 and "(signal SIGUSR1)" in output
