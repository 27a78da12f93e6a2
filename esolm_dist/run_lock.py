"""One trainer per run folder: rank 0 holds ``RUN_DIR/.esolm-train.lock`` for the whole run.

The lock is a file created with O_EXCL (atomic on local and shared filesystems, unlike flock on
many network filesystems) holding the holder's host, pid and SLURM job id. A second trainer
stops at once naming the holder. A lock left behind by a process that died without releasing
it is taken over, and the trainer says so, when it is provably stale: its pid is dead on this
host, or it belongs to an earlier start of this same SLURM job (a requeue after a hard kill).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".esolm-train.lock"


class RunLockError(RuntimeError):
    """Another trainer holds the run folder; the message names it and how to proceed."""


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _stale_reason(holder: dict) -> str | None:
    """Why the recorded holder can no longer be running, or None when it may still be."""
    here = socket.gethostname()
    if holder.get("host") == here and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"pid {holder['pid']} on {here} is no longer running"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job and holder.get("slurm_restart_count") != os.environ.get(
            "SLURM_RESTART_COUNT"):
        return f"it was taken by an earlier start of SLURM job {job}, which this requeued start replaces"
    return None


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}"


class RunLock:
    """``acquire()`` on rank 0 before anything is written into the run folder; ``release()`` at exit."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises RunLockError when held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                reason = _stale_reason(holder)
                if reason is None:
                    raise RunLockError(
                        f"{self.path.parent} is in use by another trainer ({_describe(holder)}); wait for it to "
                        f"finish, give this run its own train.run_dir, or, if that trainer is gone, delete "
                        f"{self.path}") from None
                note = f"took over the stale lock {self.path} ({_describe(holder)}: {reason})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder_record(), f)
            self.held = True
            return note
        raise RunLockError(f"{self.path} was re-created by another trainer while this one took over a stale lock; "
                           "give this run its own train.run_dir")

    def _read_holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}  # being written right now, or damaged: treated as held by an unknown trainer

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
