"""A private Slurm cluster on this host for tests: munged, slurmctld and one or two slurmd.

    cluster = start_cluster(nodes=2)     # raises ClusterUnavailable(reason) when it cannot run here
    job = cluster.sbatch(["--nodes=1", "slurm/pretrain.sbatch"], env=cluster.env(SIZE="tiny"))
    record = cluster.wait(job, timeout=240)   # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    cluster.stop()                       # cancels the jobs, stops the daemons by pid, removes the files

Everything lives in one temporary directory: slurm.conf, a fresh munge key and munged's socket, the
controller's state, each slurmd's spool directory, pid and log files. The daemons listen on ports
picked free a moment before; nothing under /etc/slurm or /etc/munge and no system daemon is touched.
Client commands find the cluster through SLURM_CONF (``env()``); slurm.conf's ``AuthInfo=socket=``
points munge authentication at the private munged. The daemons run in the foreground (``-D``/``-F``)
as children of this process, so they are stopped by the pids Popen returned (and get SIGTERM if this
process dies: PR_SET_PDEATHSIG). Several slurmd on one host need Slurm built with
--enable-multiple-slurmd (Debian's is: ``scontrol show config`` says MULTIPLE_SLURMD=Yes); the nodes
are named after this host and ``localhost`` so that the first node's name, which pretrain.sbatch uses
as the rendezvous address, resolves.

Two settings make the tests fast without changing what Slurm does:

* ``AuthInfo=...,cred_expire=10``. A requeued job may start again only after its begin time, which
  Slurm 22.05 sets to now + the job-credential lifetime + 1 s (src/slurmctld/job_mgr.c, requeue:
  ``begin_time = now + cred_lifetime + 1``; the lifetime is AuthInfo's cred_expire, default 120 s,
  minimum 5): the ~2 minutes between a requeue and the restart. 10 s keeps a margin for launching
  job steps on a loaded machine (a credential older than that is refused).
* ``SchedulerParameters=sched_interval=1``: the main scheduling loop, which starts a requeued job
  once its begin time has passed, runs every second instead of every 60 s.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
CRED_EXPIRE_S = 10
START_TIMEOUT_S = 45.0


class ClusterUnavailable(Exception):
    """The cluster cannot run on this host; the message says exactly why (used as the skip reason)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the daemon's child before exec: SIGTERM when this test process dies (Linux prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def missing_binaries() -> List[str]:
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=SEARCH_PATH) is None]


def job_env_of(pid: int) -> Optional[Dict[str, str]]:
    """The environment of a live (not zombie) process, None when it is gone or unreadable."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return None
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, IndexError):
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def processes_with(variables: Dict[str, str]) -> List[int]:
    """Pids of live processes whose environment holds all of ``variables`` (this process excluded)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        env = job_env_of(int(entry))
        if env and all(env.get(k) == v for k, v in variables.items()):
            found.append(int(entry))
    return found


def _conf_text(root: Path, hostname: str, nodes: List[str], ports: Dict[str, int], cpus: int,
               memory_mb: int) -> str:
    node_lines = [f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={ports[name]} "
                  f"CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN" for name in nodes]
    return "\n".join([
        "ClusterName=stablemoetest",
        f"SlurmctldHost={hostname}(127.0.0.1)",
        f"SlurmctldPort={ports['slurmctld']}",
        f"SlurmdPort={ports[nodes[0]]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1",
        "JobRequeue=1",
        "ReturnToService=2",
        "MpiDefault=none",
        "MailProg=/bin/true",
        *node_lines,
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


class SlurmCluster:
    """A running private cluster (see the module docstring); build it with :func:`start_cluster`."""

    def __init__(self, root: Path, nodes: List[str]):
        self.root, self.nodes = root, nodes
        self.conf = root / "slurm.conf"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.two_node_reason: Optional[str] = None  # set by a caller that fell back to one node

    # -- client side -------------------------------------------------------------------------------
    def env(self, **extra) -> Dict[str, str]:
        """This process's environment without any Slurm job variables, pointed at the private cluster,
        with this Python's bin directory first on PATH (the jobs run python/torchrun from there)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(SLURM_CONF=str(self.conf), PATH=f"{Path(sys.executable).parent}{os.pathsep}{SEARCH_PATH}",
                   PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *command: str, timeout: float = 30, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), env=kwargs.pop("env", None) or self.env(), capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, args: List[str], env: Dict[str, str], cwd: Path = REPO) -> str:
        """Submit with the real sbatch (from ``cwd``, the repository root by default); the job id."""
        done = self.run("sbatch", "--parsable", *[str(a) for a in args], env=env, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> List[Dict[str, str]]:
        """``scontrol show job -o`` as dicts, one per job (an array job: one per task)."""
        done = self.run("scontrol", "show", "job", "-o", job_id)
        return [dict(re.findall(r"(\w[\w/:]*)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> Dict[str, str]:
        return self.jobs(job_id)[0]

    def wait(self, job_id: str, timeout: float, count: int = 1) -> List[Dict[str, str]]:
        """Poll until ``count`` records of the job (array tasks) are in a final state; their records.
        A requeued job is PENDING/RUNNING again in between, never final, so this waits through it."""
        deadline = time.monotonic() + timeout
        records: List[Dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if len(records) >= count and all(r.get("JobState") in TERMINAL for r in records):
                return records
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished within {timeout:.0f} s: "
                             f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}")

    def listpids(self, job_id: str) -> List[int]:
        """``scontrol listpids``: the pids Slurm's process tracking holds for the job, on every node."""
        pids = set()
        for node in self.nodes:
            done = self.run("scontrol", "listpids", job_id, node, check=False)
            pids.update(int(line.split()[0]) for line in done.stdout.splitlines() if line[:1].isdigit())
        return sorted(pids)

    # -- daemons -----------------------------------------------------------------------------------
    def _spawn(self, name: str, command: List[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with status {proc.returncode}: "
                                         f"{_tail(self.root / 'log' / f'{name}.out')}")

    def _start(self) -> None:
        munge = self.root / "munge"
        self._spawn("munged", [shutil.which("munged", path=SEARCH_PATH), "-F", f"--socket={munge}/munge.socket",
                               f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                               f"--seed-file={munge}/munged.seed", f"--log-file={self.root}/log/munged.log"])
        self._until(lambda: (munge / "munge.socket").exists(), "munged created no socket")
        self._spawn("slurmctld", [shutil.which("slurmctld", path=SEARCH_PATH), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True)
            self._spawn(f"slurmd-{node}", [shutil.which("slurmd", path=SEARCH_PATH), "-D", "-f", str(self.conf),
                                           "-N", node])
        self._until(self._nodes_idle, "the node(s) did not become idle")

    def _nodes_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
        states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
        return done.returncode == 0 and all(states.get(node) == "idle" for node in self.nodes)

    def _until(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.3)
        logs = "; ".join(f"{p.name}: {_tail(p, 3)}" for p in sorted((self.root / "log").glob("*.log")))
        raise ClusterUnavailable(f"{what} within {START_TIMEOUT_S:.0f} s ({logs})")

    def stop(self) -> List[str]:
        """Cancel every job, wait for them to end, stop the daemons by pid, end any process still
        carrying this cluster's SLURM_CONF (a job's or a slurmstepd); return those, as 'pid cmdline'."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            try:
                ids = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=10)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in sorted(self.procs, key=lambda n: ("slurmd" not in n, n == "munged")):  # slurmd, ctld, munged
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        leftovers = []
        for pid in processes_with({"SLURM_CONF": str(self.conf)}):
            try:
                leftovers.append(f"{pid} {_cmdline(pid)}")
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        return leftovers


def start_cluster(nodes: int = 1, cpus: int = 2) -> SlurmCluster:
    """Start a private cluster of ``nodes`` slurmd on this host; ClusterUnavailable says why it cannot."""
    missing = missing_binaries()
    if missing:
        raise ClusterUnavailable(f"Slurm is not installed: no {', '.join(missing)} on PATH (Debian: apt-get install "
                                 f"slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"not root (uid {os.geteuid()}): slurmd and slurmstepd must run as root to "
                                 f"start jobs")
    hostname = socket.gethostname().split(".")[0]
    names = [hostname, "localhost"][:nodes]
    if nodes > 2 or len(set(names)) < nodes:
        raise ClusterUnavailable(f"{nodes} nodes need {nodes} distinct names resolving to this host "
                                 f"(have {sorted(set(names))})")
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp" if os.path.isdir("/tmp") else None))
    root.chmod(0o755)  # munged requires its socket directory (and the path to it) searchable by all
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ports = {name: _free_port() for name in ["slurmctld", *names]}
    memory_mb = min(2048, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 256)
    cluster = SlurmCluster(root, names)
    cluster.conf.write_text(_conf_text(root, hostname, names, ports, max(1, min(cpus, os.cpu_count() or 1)),
                                       memory_mb))
    try:
        cluster._start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
