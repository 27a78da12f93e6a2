"""A real two-node SLURM cluster on this machine, for tests/test_slurm.py (not a mock).

Debian's slurm-wlm 22.05 is built with multiple-slurmd support, so one machine can run several
slurmd daemons, each acting as one node. As root, with no systemd, the fixture

1. installs ``slurm-wlm munge`` with apt-get when the daemons are missing (bounded by a timeout),
2. writes its own slurm.conf under ``BASE`` (nodes n1 and n2: NodeHostname = this host,
   NodeAddr 127.0.0.1, one port each; a ``debug`` partition),
3. starts munged (unless one already answers), slurmctld and ``slurmd -N n1`` / ``slurmd -N n2``
   in the foreground as child processes, waits until ``sinfo`` shows both nodes idle,
4. and at the end cancels the remaining jobs and stops every daemon it started by pid.

Clients find the cluster through ``SLURM_CONF`` (``cluster.env``); /etc/slurm is not touched.
Where SLURM cannot be had (not root, no apt-get, install failed) the fixture skips with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

BASE = Path(os.environ.get("ESOLM_SLURM_BASE", "/tmp/esolm-slurm"))
NODES = ("n1", "n2")
CTLD_PORT = 16817
FIRST_SLURMD_PORT = 16818
INSTALL_TIMEOUT_S = 600
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


class SlurmUnavailable(Exception):
    """SLURM cannot be installed or started here; the message is the skip reason."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if _which(name) is None]


def ensure_installed(timeout_s: float = INSTALL_TIMEOUT_S) -> None:
    """Install Debian's slurm-wlm and munge when any daemon or client is missing."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(missing_binaries())} missing) and installing "
                               "it needs root")
    if _which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install slurm-wlm with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout_s
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    output = ""
    for command in (install, ["apt-get", "update", "-q"], install):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(command)}` did not finish within {timeout_s:.0f} s") from None
        output = (done.stdout + done.stderr)[-600:]
        if command is install and done.returncode == 0 and not missing_binaries():
            return
    raise SlurmUnavailable(f"apt-get could not install slurm-wlm munge: {output.strip()}")


def _stop_pid(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL one process by pid (never by name)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return
        except ChildProcessError:  # not our child: poll its existence instead
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def parse_record(line: str) -> dict[str, str]:
    """``scontrol show job -o`` / ``show node -o`` output -> {key: value}."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, all started (and stopped) by this object."""

    def __init__(self, base: Path = BASE, nodes: tuple[str, ...] = NODES):
        self.base = base
        self.nodes = nodes
        self.conf = base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_files: list = []

    # ---- bring-up ---------------------------------------------------------------------------------
    def write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        for sub in ("etc", "log", "run", "ctld"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "# written by tests/slurm_cluster.py: a two-node cluster on one machine",
            "ClusterName=esolm-ci",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={CTLD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a requeued job may start again cred_expire + 1 s after it ended (default 120 s)
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={self.base}/ctld",
            f"SlurmdSpoolDir={self.base}/spool-%n",
            f"SlurmctldPidFile={self.base}/run/slurmctld.pid",
            f"SlurmdPidFile={self.base}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.base}/log/slurmctld.log",
            f"SlurmdLogFile={self.base}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (there is no accounting)
            "KillWait=20",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
        ]
        for index, node in enumerate(self.nodes):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 "
                         f"Port={FIRST_SLURMD_PORT + index} CPUs={cpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _munge_works(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                           timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munged(self) -> None:
        if self._munge_works():
            return  # someone else's munged: use it, leave it running
        key = Path("/etc/munge/munge.key")
        if not key.is_file() or key.stat().st_size == 0:
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        for folder, mode in (("/etc/munge", 0o700), ("/var/lib/munge", 0o711), ("/var/log/munge", 0o700),
                             ("/run/munge", 0o755)):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "munge", "munge")
            os.chmod(folder, mode)
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
        for stale in ("/run/munge/munge.socket.2", "/run/munge/munge.socket.2.lock"):
            Path(stale).unlink(missing_ok=True)
        self._spawn("munged", [_which("munged"), "--foreground", "--force"], user="munge", group="munge")
        self._wait(self._munge_works, 20, "munged did not answer")

    def _spawn(self, name: str, command: list[str], **kwargs) -> None:
        log = open(self.base / "log" / f"{name}.stdout", "ab")  # closed in stop()
        self.log_files.append(log)
        self.procs[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)

    def _wait(self, ready, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode} while starting; "
                                           f"{self.tail_logs()}")
            time.sleep(0.3)
        raise SlurmUnavailable(f"{message} within {timeout_s:.0f} s; {self.tail_logs()}")

    def _nodes_idle(self) -> bool:
        lines = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.splitlines()
        states = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
        return all(states.get(node) == "idle" for node in self.nodes)

    def start(self) -> SlurmCluster:
        self.stop_leftovers()
        self.write_config()
        self._start_munged()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        for node in self.nodes:
            (self.base / f"spool-{node}").mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, 90, f"nodes {', '.join(self.nodes)} did not become idle")
        return self

    def stop_leftovers(self) -> None:
        """Daemons of an earlier session that died before its teardown (found by their pid files)."""
        for pid_file in sorted((self.base / "run").glob("*.pid")):
            try:
                pid = int(pid_file.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError, IndexError):
                pid_file.unlink(missing_ok=True)
                continue
            if "slurm" in cmdline and str(self.conf) in cmdline:
                _stop_pid(pid)
            pid_file.unlink(missing_ok=True)

    # ---- teardown ---------------------------------------------------------------------------------
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    time.sleep(0.5)
        for name in [f"slurmd-{node}" for node in self.nodes] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                _stop_pid(proc.pid)
        for log in self.log_files:
            log.close()
        self.log_files.clear()

    # ---- clients ----------------------------------------------------------------------------------
    def run(self, *command: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(list(command), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def submit(self, script: str | Path, *sbatch_args: str, env: dict | None = None,
               cwd: str | Path | None = None) -> int:
        out = self.run("sbatch", "--parsable", *sbatch_args, str(script), env=env, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return parse_record(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def wait_until(self, job_id: int, done, timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
        """Poll the job until ``done(record)``; fails with the job record and log tails on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.job(job_id)
            if done(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {record.get('JobState')} after {timeout_s:.0f} s: "
                                     f"{record}\n{self.tail_logs()}")
            time.sleep(poll_s)

    def wait_finished(self, job_id: int, timeout_s: float) -> dict[str, str]:
        return self.wait_until(job_id, lambda r: r.get("JobState") in TERMINAL_STATES, timeout_s)

    def tail_logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


def _skip_reason() -> str | None:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM tests need Linux"
    if os.geteuid() != 0:
        return "SLURM tests start munged, slurmctld and slurmd and so need root (run as root to include them)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running two-node cluster; skips with the reason where SLURM cannot be installed or started."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    cluster = SlurmCluster()
    try:  # installed but not starting is a failure, not a skip
        yield cluster.start()
    finally:
        cluster.stop()
