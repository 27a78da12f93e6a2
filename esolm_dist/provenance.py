"""Where a run came from: code version, command line, layout, hosts and package versions (MLflow tags)."""

from __future__ import annotations

import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("esolm-dist", "torch", "megatron-core", "deepspeed", "webdataset", "mlflow", "flash-attn", "apex")


def _git(*args: str) -> str | None:
    """Output of a git command in the package's checkout; None outside a git checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # optional (flash-attn, apex): absent is the common case
    return versions


def run_tags(layout: dict[str, int], hosts: list[str]) -> dict[str, str]:
    """MLflow tags of a training run. ``hosts``: every rank's hostname (rank order)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    tags = {
        "esolm.command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "esolm.layout": f"TP{layout['tensor']} x PP{layout['pipeline']} x DP{layout['data']}",
        "esolm.world_size": str(len(hosts)),
        "esolm.nodes": str(len(set(hosts))),
        "esolm.host": socket.gethostname(),
        "mlflow.source.git.commit": commit or "unknown (not a git checkout)",
        "esolm.git_dirty": "unknown" if status is None else str(bool(status)).lower(),
    }
    tags.update({f"esolm.version.{name}": version for name, version in package_versions().items()})
    return tags
