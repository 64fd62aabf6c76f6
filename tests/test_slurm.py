"""scripts/slurm_pretrain.sh under a real one-node SLURM cluster, and the SIGTERM path it relies on.

The cluster (munged, slurmctld, slurmd from Debian's munge and slurm-wlm packages; `.ci/run`
installs them) runs on this machine as the current user: a generated slurm.conf (CPU only,
proctrack/linuxproc, no cgroups, select/cons_tres, job completions in a text file that `sacct -c`
reads), temporary state, spool and log folders, free ports, every daemon stopped at the end.
Jobs are submitted from a folder outside the repository, with a PATH that holds no virtual
environment, on the tiny config at one CPU process per node:

- a run saves, stops part-way (as at the end of an allocation) and ends COMPLETED; the same
  `sbatch` line again, chained with `--dependency afterok:`, resumes it and finishes;
- `scancel --signal TERM` (what the time limit's `--signal` sends) while the job starts up: the
  run saves after its first iteration and the job still ends COMPLETED, exit code 0;
- a plain `scancel` during training: the run saves before the job ends (CANCELLED).

Without the binaries the cluster tests skip; the launcher and the SIGTERM latch are tested
without SLURM.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron.core import checkpointing
from megatron.training.cli import run_cli
from megatron.training.resume import SigtermLatch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "slurm_pretrain.sh"
LAUNCHER = REPO / "scripts" / "torchrun_graceful.py"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun", "sacct")
# One CPU process, short sequences, small batches: an iteration takes well under a second.
FAST = ["--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--lr-warmup-iters", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), SYSTEM_PATH]))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class LocalSlurm:
    """A one-node SLURM cluster in `root`, for this process's user. Clients run with `env()`."""

    NODE = "fp8node"
    FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
             "BOOT_FAIL", "DEADLINE"}

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[str] = []
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"

    def env(self, **extra) -> dict:
        env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", str(self.root)), "LANG": "C.UTF-8",
               "SLURM_CONF": str(self.conf), "TMPDIR": str(self.root)}
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _daemon(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                           start_new_session=True))
        log.close()

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(mode=0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge = self.root / "munge"
        self._daemon(_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                     f"--seed-file={munge / 'munged.seed'}")
        self._wait(lambda: self.munge_socket.exists(), 20, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf())
        self._daemon(_which("slurmctld"), "-D", "-i", "-f", str(self.conf))
        self._daemon(_which("slurmd"), "-D", "-N", self.NODE, "-f", str(self.conf))
        self._wait(lambda: self.client("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60,
                   "the node did not come up")

    def _slurm_conf(self) -> str:
        user, root, host = getpass.getuser(), self.root, socket.gethostname().split(".")[0]
        return f"""\
ClusterName=fp8test
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
KillWait=30
MinJobAge=600
InactiveLimit=0
NodeName={self.NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={self.NODE} Default=YES MaxTime=INFINITE State=UP
"""

    @staticmethod
    def _wait(ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(message)
            time.sleep(0.2)

    def client(self, *argv: str, check: bool = False, **env) -> subprocess.CompletedProcess:
        done = subprocess.run([_which(argv[0]), *argv[1:]], env=self.env(**env), capture_output=True,
                              text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
        return done

    def submit(self, cwd: Path, sbatch_args: list[str], script_args: list[str], **env) -> str:
        done = subprocess.run([_which("sbatch"), "--parsable", *sbatch_args, str(SCRIPT), *script_args],
                              cwd=cwd, env=self.env(**env), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        job = done.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job_field(self, job: str, field: str) -> str:
        out = self.client("scontrol", "show", "job", "-o", job).stdout
        match = re.search(rf"\b{field}=(\S*)", out)
        return match.group(1) if match else ""

    def wait(self, job: str, timeout: float = 120) -> tuple[str, str]:
        """Wait for `job` to end; its (State, ExitCode) as `sacct` reports them (from the job
        completion file: no slurmdbd here), or as slurmctld does where sacct cannot read that
        file (`sacct -c` is gone from SLURM 23.02 on)."""
        self._wait(lambda: self.job_field(job, "JobState") in self.FINAL, timeout, f"job {job} did not end")
        ended = self.job_field(job, "JobState"), self.job_field(job, "ExitCode")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = self.client("sacct", "-c", "-n", "-P", "-j", job, "-o", "JobID,State,ExitCode")
            if done.returncode != 0:
                return ended
            for fields in (line.split("|") for line in done.stdout.splitlines()):
                if fields[0] == job:
                    assert (fields[1].split()[0], fields[2]) == ended, (fields, ended)
                    return ended
            time.sleep(0.2)
        raise TimeoutError(f"no completion record for job {job}")

    def stop(self) -> None:
        """Cancel whatever still runs, then stop the daemons this object started."""
        if self.jobs and self.procs:
            self.client("scancel", *self.jobs)
            try:
                self._wait(lambda: not self.client("squeue", "-h").stdout.strip(), 45, "jobs still running")
            except (TimeoutError, subprocess.TimeoutExpired):
                pass  # the daemons are stopped next whatever the jobs do
        for proc in reversed(self.procs):
            _stop(proc)

    def logs(self) -> str:
        text = []
        for path in sorted((self.root / "log").glob("*")):
            text.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(text)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        pytest.skip(f"SLURM/munge binaries missing ({', '.join(missing)}): apt-get install slurmctld slurmd "
                    f"slurm-client munge (.ci/run does)")
    cluster = LocalSlurm(Path(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Exception as exc:
        logs = cluster.logs()
        cluster.stop()
        if os.geteuid() != 0:  # slurmd launches jobs through root-only calls on most systems
            pytest.skip(f"the local SLURM cluster did not start as {getpass.getuser()} (not root): {exc}")
        raise RuntimeError(f"the local SLURM cluster did not start:\n{logs}") from exc
    yield cluster
    cluster.stop()


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def metrics_iterations(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line)["iteration"] for line in f]


def job_env(run_dir: Path, **extra) -> dict:
    env = dict(CONFIG="configs/gpt-tiny.yaml", RUN_DIR=run_dir, RDZV_PORT=free_port(), **extra)
    if not (REPO / ".venv" / "bin" / "python").exists():  # the script finds .venv itself; else say which
        env["PYTHON"] = sys.executable
    return env


@pytest.mark.slow
@pytest.mark.distributed
def test_sbatch_runs_saves_resumes_and_saves_on_sigterm(slurm, builtin_corpus_small, tmp_path):
    submit_dir = tmp_path / "submit"  # not the repository
    submit_dir.mkdir()
    data = builtin_corpus_small.training_args()
    guard = ["--time", "15"]  # a hung job ends; the limit less 10 minutes becomes --exit-duration-in-mins

    # A run that saves and stops part-way (as at the end of an allocation), and the same sbatch
    # line again, chained on the first job's success, that resumes it and finishes.
    run_dir = tmp_path / "run"
    line = data + FAST + ["--train-iters", "6", "--save-interval", "2", "--exit-interval", "3"]
    first = slurm.submit(submit_dir, guard, line, **job_env(run_dir))
    second = slurm.submit(submit_dir, guard + [f"--dependency=afterok:{first}"], line, **job_env(run_dir))
    out_first, out_second = submit_dir / f"fp8-lm-{first}.out", submit_dir / f"fp8-lm-{second}.out"
    assert slurm.wait(first) == ("COMPLETED", "0:0"), read(out_first) + slurm.logs()
    assert "1 node(s) x 1 process(es) on cpu" in read(out_first)
    assert "> nothing to resume" in read(out_first) and "--exit-interval 3 reached" in read(out_first)
    assert slurm.wait(second) == ("COMPLETED", "0:0"), read(out_second) + slurm.logs()
    assert "> loaded iteration 3" in read(out_second)
    assert metrics_iterations(run_dir) == [1, 2, 3, 4, 5, 6]
    assert checkpointing.latest_iteration(str(run_dir / "checkpoints")) == 6

    # The time limit's early SIGTERM (`--signal`: the job's steps, not the batch shell), here while
    # the job starts up: kept until the first iteration, saved there, and the job COMPLETED.
    run_dir = tmp_path / "sigterm"
    job = slurm.submit(submit_dir, guard, data + FAST + ["--train-iters", "1000"], **job_env(run_dir))
    out = submit_dir / f"fp8-lm-{job}.out"
    LocalSlurm._wait(lambda: slurm.client("squeue", "-h", "-s", "-j", job, "-o", "%i").stdout.strip(), 60,
                     f"job {job}'s step did not start:\n{read(out)}")
    time.sleep(1.0)  # the launcher has started (importing torch), its workers not yet
    assert " iteration " not in read(out)
    slurm.client("scancel", "--signal=TERM", job, check=True)
    assert slurm.wait(job) == ("COMPLETED", "0:0"), read(out) + slurm.logs()
    assert "SIGTERM received during start-up" in read(out), read(out)
    assert checkpointing.latest_iteration(str(run_dir / "checkpoints")) == 1
    assert metrics_iterations(run_dir) == [1]

    # A plain scancel during training (the batch shell is signalled too): the run still saves.
    job = slurm.submit(submit_dir, guard, data + FAST + ["--train-iters", "1000"], **job_env(run_dir))
    out = submit_dir / f"fp8-lm-{job}.out"
    LocalSlurm._wait(lambda: re.search(r" iteration +3/", read(out)), 90, f"job {job} did not train:\n{read(out)}")
    slurm.client("scancel", job, check=True)
    state, _ = slurm.wait(job)
    assert state == "CANCELLED"
    assert "SIGTERM received" in read(out), read(out)
    saved = checkpointing.latest_iteration(str(run_dir / "checkpoints"))
    assert saved >= 3 and metrics_iterations(run_dir) == list(range(1, saved + 1)), read(out)


# ------------------------------------------------------------------------------ without SLURM

@pytest.mark.slow
def test_launcher_keeps_a_sigterm_sent_during_start_up_and_exits_0(builtin_corpus_small, tmp_path):
    """As SLURM does, the launcher and its workers get SIGTERM while they import: the workers
    save after their first iteration and every process exits 0 (stock torchrun exits 1)."""
    ckpt = tmp_path / "ck"
    argv = [sys.executable, str(LAUNCHER), "--standalone", "--nproc-per-node", "2", str(REPO / "pretrain_gpt.py"),
            "--config", str(REPO / "configs" / "gpt-tiny.yaml"), "--device", "cpu", *FAST,
            *builtin_corpus_small.training_args(), "--train-iters", "1000", "--save", str(ckpt),
            "--metrics-file", str(tmp_path / "metrics.jsonl")]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline:  # the workers exist and import torch
        done = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        workers = [int(pid) for pid in done.stdout.split()]
        time.sleep(0.1)
    assert len(workers) == 2
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "SIGTERM received during start-up" in out and "stopping after iteration 1: SIGTERM received" in out
    assert checkpointing.latest_iteration(str(ckpt)) == 1


def test_run_cli_latches_sigterm_for_the_training_loop_and_restores_the_handler():
    seen = {}

    def main():
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # would end pytest without the latch
        seen["received"] = SigtermLatch.current().received
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(main, defer_sigterm=True) == 0
    assert seen == {"received": True} and signal.getsignal(signal.SIGTERM) is before


def test_run_cli_defers_sigterm_when_the_launcher_blocked_it():
    seen = {}

    def main():
        seen["latch"] = SigtermLatch.current()
        return 0

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        # Pending on this thread while blocked (a launched worker blocks it in every thread; here
        # pytest's other threads do not, so the signal is sent to this one).
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        assert run_cli(main) == 0
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert seen["latch"] is not None and seen["latch"].received
    assert run_cli(main) == 0 and seen["latch"] is None  # not blocked: nothing deferred
