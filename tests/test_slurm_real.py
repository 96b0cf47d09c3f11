"""slurm/*.sbatch under a real Slurm (22.05: slurmctld, slurmd, munged on this host, tests/slurm_cluster.py),
submitted with the real sbatch: pretraining to the end (checkpoint, evaluation, exit 0); one time-limit
signal -> save -> requeue -> resume cycle whose losses equal the uninterrupted run's; scancel leaving no
process of the job; a two-node job (two slurmd on this host) with the same losses; the preprocessing job
array; the converter. Skipped, with the reason, where the daemons cannot run (not installed, not root).

The trainer is tiny (2 layers, hidden 32, 120 iterations of 8 sequences of 32 tokens, 4 experts, EP 2 over
2 processes) so that each job takes seconds; the Slurm mechanics are the same as for a large model.
"""
import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from data_fixtures import CORPUS, tiny_dataset
from slurm_cluster import ClusterUnavailable, job_env_of, processes_with, start_cluster
from stablemoe_megatron.runtime import free_port

ITERS = 120
MODEL_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
               "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "4",
               "--global-batch-size", "8", "--moe-sublayers-per-expert", "1", "--log-interval", "1",
               "--eval-interval", "1000", "--eval-iters", "1"]
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster():
    """Two slurmd when this Slurm supports it (cluster.two_node_reason is None), else one; started once."""
    try:
        started = start_cluster(nodes=2)
    except ClusterUnavailable as two_nodes:
        try:
            started = start_cluster(nodes=1)
        except ClusterUnavailable as one_node:
            pytest.skip(f"no Slurm cluster on this host: {one_node}")
        started.two_node_reason = f"two slurmd on one host do not start: {two_nodes}"
    yield started
    leftovers = started.stop()
    assert not leftovers, f"processes of the test cluster were still running after its jobs ended: {leftovers}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny dataset, plus the DATA_DIR layout the tiny recipes read (corpus_{valid,test}_text_document)."""
    info = tiny_dataset(tmp_path_factory.mktemp("slurm_data"))
    data_dir = Path(info["dir"]) / "recipe_dir"
    data_dir.mkdir(exist_ok=True)
    for split in ("valid", "test"):
        for ext in ("bin", "idx"):
            link = data_dir / f"corpus_{split}_text_document.{ext}"
            if not link.exists():
                link.symlink_to(f"{info['valid_prefix']}.{ext}")
    return dict(info, recipe_dir=str(data_dir))


def submit_pretrain(cluster, data, work: Path, nodes: int = 1, per_node: int = 2, iters: int = ITERS,
                    extra: tuple = ()):
    """sbatch slurm/pretrain.sbatch (SIZE=tiny, the stablemoe recipe) from the repository root, ``extra``
    trainer flags after MODEL_FLAGS; returns (job id, RUN_DIR, LOG_DIR, the job's output file)."""
    run_dir, log_dir = work / "run", work / "logs"
    env = cluster.env(SIZE="tiny", GPUS_PER_NODE=per_node, DATA_DIR=data["recipe_dir"], DATA_PATH=data["prefix"],
                      TOKENIZER_FLAGS=f"--tokenizer-type SentencePieceTokenizer --tokenizer-model "
                                      f"{data['tokenizer_model']}",
                      TRAIN_ITERS=iters, RUN_DIR=run_dir, LOG_DIR=log_dir, MASTER_PORT=free_port())
    job = cluster.sbatch([f"--nodes={nodes}", "--gpus-per-node=0", "--time=10", f"--output={work}/slurm-%j.out",
                          "slurm/pretrain.sbatch", *MODEL_FLAGS, *extra], env=env)
    return job, run_dir, log_dir, work / f"slurm-{job}.out"


EVENTS = ("starting at iteration", "saved checkpoint", "exiting at iteration", "stopped:", "SIGUSR1", "Error")


def describe(out: Path, log_dir: Path) -> str:
    """The job's output and every node log's events (start, saves, stops, errors), for assertion messages."""
    parts = [out.read_text()[-2000:] if out.is_file() else "(no job output)"]
    for log in sorted(log_dir.glob("*.log")) if log_dir.is_dir() else []:
        events = [line[:400] for line in log.read_text().splitlines() if any(e in line for e in EVENTS)]
        parts.append(f"--- {log.name}\n" + "\n".join(events[-30:]))
    return "\n".join(parts)


def training_losses(run_dir: Path) -> list:
    """[(iteration, lm loss)] in the order the trainer wrote them to RUN_DIR/metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["iteration"], r["lm_loss"]) for r in records if "lm_loss" in r and "split" not in r]


def wait_for_iteration(cluster, job: str, run_dir: Path, at_least: int, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and any(i >= at_least for i, _ in training_losses(run_dir)):
            return
        state = cluster.job(job)["JobState"]
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state} before iteration {at_least}"
        time.sleep(0.2)
    raise AssertionError(f"job {job}: no iteration {at_least} within {timeout} s")


def assert_completed(record: dict, restarts: int, details: str) -> None:
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", str(restarts)), \
        f"{record['JobState']} exit {record['ExitCode']} restarts {record['Restarts']}\n{details}"


def stamp(text: str, marker: str) -> datetime:
    """The time of the first '[YYYY-mm-dd HH:MM:SS] ...marker...' line of a job output."""
    line = next(line for line in text.splitlines() if marker in line)
    return datetime.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def uninterrupted(cluster, data, tmp_path_factory):
    """One pretrain job run to the end: the reference of the resumed and the two-node runs."""
    work = tmp_path_factory.mktemp("slurm_uninterrupted")
    job, run_dir, log_dir, out = submit_pretrain(cluster, data, work)
    (record,) = cluster.wait(job, JOB_TIMEOUT_S)
    return dict(job=job, record=record, run_dir=run_dir, log_dir=log_dir, out=out)


@pytest.mark.slow
def test_pretrain_job_trains_saves_evaluates_and_exits_0(uninterrupted):
    run, logs = uninterrupted["run_dir"], uninterrupted["log_dir"]
    assert_completed(uninterrupted["record"], 0, describe(uninterrupted["out"], logs))
    save = run / "checkpoints"
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == ITERS
    assert json.loads((save / f"iter_{ITERS:07d}" / "train_state.json").read_text())["iteration"] == ITERS
    assert [i for i, _ in training_losses(run)] == list(range(1, ITERS + 1))
    log = (logs / "node0.restart0.log").read_text()
    assert "EP 2 DP 2" in log
    assert f"validation loss at iteration {ITERS}" in log and f"test loss at iteration {ITERS}" in log
    assert json.loads((save / "run.lock").read_text())["slurm_job_id"] == uninterrupted["job"]


@pytest.mark.slow
def test_time_limit_signal_requeues_and_resumes_with_the_uninterrupted_losses(cluster, data, uninterrupted,
                                                                             tmp_path):
    """Slurm's --signal=USR1@T goes to every process of the job steps, not the batch shell: `scancel
    --signal=USR1` sends it the same way, at a moment the test chooses (a time limit is only checked every
    ~30 s). A periodic save comes first, as in a real run: its checkpoint writer's helper processes then
    exist when the signal arrives and must survive it."""
    job, run, logs, out = submit_pretrain(cluster, data, tmp_path, extra=("--save-interval", "4"))
    wait_for_iteration(cluster, job, run, 5)  # the save at iteration 4 is done
    cluster.run("scancel", "--signal=USR1", job)
    (record,) = cluster.wait(job, JOB_TIMEOUT_S)
    details = describe(out, logs)
    assert_completed(record, 1, details)
    found = re.search(r"exiting at iteration (\d+) \(signal SIGUSR1\)", (logs / "node0.restart0.log").read_text())
    assert found, details
    saved = int(found.group(1))
    assert 5 <= saved < ITERS and (run / "checkpoints" / f"iter_{saved:07d}" / "train_state.json").is_file()
    assert (logs / "preempted.restart0").is_file()
    assert f"starting at iteration {saved}, " in (logs / "node0.restart1.log").read_text(), details
    text = out.read_text()
    assert "time-limit signal: the trainer saved a checkpoint (exit 0); requeueing" in text, details
    delay = (stamp(text, "restart 1:") - stamp(text, "requeueing")).total_seconds()
    assert delay <= 60, f"restarted {delay:.0f} s after the requeue (cred_expire not in effect?)\n{details}"
    resumed = training_losses(run)
    assert [i for i, _ in resumed] == list(range(1, ITERS + 1)), "an iteration was repeated or skipped"
    reference = dict(training_losses(uninterrupted["run_dir"]))
    assert dict(resumed) == pytest.approx(reference, abs=1e-6, rel=0)


@pytest.mark.slow
def test_scancel_leaves_no_process_of_the_job(cluster, data, tmp_path):
    job, run, logs, out = submit_pretrain(cluster, data, tmp_path, iters=100000, extra=("--save-interval", "4"))
    wait_for_iteration(cluster, job, run, 6)
    holder = json.loads((run / "checkpoints" / "run.lock").read_text())
    mine = {"SLURM_CONF": str(cluster.conf), "SLURM_JOB_ID": job}
    started = set(cluster.listpids(job)) | set(processes_with(mine))
    assert holder["slurm_job_id"] == job and holder["pid"] in started, (holder, started)
    cluster.run("scancel", job)
    (record,) = cluster.wait(job, JOB_TIMEOUT_S)
    assert (record["JobState"], record["Restarts"]) == ("CANCELLED", "0"), describe(out, logs)
    deadline = time.monotonic() + 90  # Slurm's KillWait (30 s) and torchrun's own 30 s, then SIGKILL
    alive = started
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in started if (job_env_of(pid) or {}).get("SLURM_JOB_ID") == job}
        time.sleep(0.5)
    assert not alive, f"still running after scancel: {sorted(alive)}"
    assert not processes_with(mine)
    assert not (logs / "preempted.restart0").exists()  # SIGTERM is not the time-limit signal: no requeue
    found = re.search(r"exiting at iteration (\d+) \(signal SIGTERM\)", (logs / "node0.restart0.log").read_text())
    assert found, describe(out, logs)  # scancel's SIGTERM reached every process: the trainer saved and stopped
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == found.group(1)


@pytest.mark.slow
def test_two_node_job_has_the_single_node_losses(cluster, data, uninterrupted, tmp_path):
    """2 nodes x 1 process (c10d rendezvous on the first node) is the same EP 2 x DP 2 layout as 1 node x 2."""
    if cluster.two_node_reason:
        pytest.skip(cluster.two_node_reason)
    job, run, logs, out = submit_pretrain(cluster, data, tmp_path, nodes=2, per_node=1)
    (record,) = cluster.wait(job, JOB_TIMEOUT_S)
    details = describe(out, logs)
    assert_completed(record, 0, details)
    assert record["NumNodes"] == "2" and sorted(record["NodeList"].split(",")) == sorted(cluster.nodes)
    assert (logs / "node0.restart0.log").is_file() and (logs / "node1.restart0.log").is_file()
    assert re.search(r"2 node\(s\) x 1, rendezvous \S+:\d+", out.read_text()), details
    assert dict(training_losses(run)) == pytest.approx(dict(training_losses(uninterrupted["run_dir"])), abs=1e-6,
                                                       rel=0)


def test_preprocess_job_array_tokenises_each_shard(cluster, data, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    lines = (CORPUS / "train.jsonl").read_text().splitlines()
    for index in range(2):
        (shards / f"part_{index}.jsonl").write_text("\n".join(lines[5 * index:5 * index + 5]) + "\n")
    out_dir = tmp_path / "out"
    env = cluster.env(INPUTS=shards / "*.jsonl", OUTPUT_DIR=out_dir,
                      TOKENIZER_ARGS=f"--tokenizer-type SentencePieceTokenizer --tokenizer-model "
                                     f"{data['tokenizer_model']}")
    job = cluster.sbatch(["--array=0-1", "--cpus-per-task=1", "--mem=256M", f"--output={tmp_path}/pre-%A_%a.out",
                          "slurm/preprocess.sbatch"], env=env)
    records = cluster.wait(job, JOB_TIMEOUT_S, count=2)
    outputs = {r["ArrayTaskId"]: (tmp_path / f"pre-{job}_{r['ArrayTaskId']}.out").read_text() for r in records}
    assert sorted(outputs) == ["0", "1"]
    for record in records:
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), outputs
    assert sorted(p.name for p in out_dir.iterdir()) == [f"part_{i}_text_document.{e}" for i in range(2)
                                                         for e in ("bin", "idx")]
    for task in ("0", "1"):
        assert "text: 5 documents" in outputs[task], outputs[task]
    blend = f"{out_dir}/part_0_text_document {out_dir}/part_1_text_document"
    assert blend in outputs["0"] and "--data-path" not in outputs["1"]


def test_convert_job_exports_and_reports_failure(cluster, uninterrupted, tmp_path):
    options = ["--cpus-per-task=1", "--mem=512M", f"--output={tmp_path}/convert-%j.out", "slurm/convert.sbatch"]
    exported = tmp_path / "exported"
    good = cluster.sbatch([*options, "export", uninterrupted["run_dir"] / "checkpoints", exported], env=cluster.env())
    bad = cluster.sbatch([*options, "inspect", tmp_path / "missing"], env=cluster.env())
    (good_record,) = cluster.wait(good, JOB_TIMEOUT_S)
    (bad_record,) = cluster.wait(bad, JOB_TIMEOUT_S)
    good_out = (tmp_path / f"convert-{good}.out").read_text()
    assert_completed(good_record, 0, good_out)
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((exported / "config.json").read_text())
    assert (bad_record["JobState"], bad_record["ExitCode"]) == ("FAILED", "2:0")
    assert "no such checkpoint directory" in (tmp_path / f"convert-{bad}.out").read_text()
