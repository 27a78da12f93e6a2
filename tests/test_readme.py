"""The README's commands work verbatim from a fresh copy of the repository, after its set-up command.

Every ```bash block runs, in order, in a copy of this working tree (tracked and untracked files, not
the ignored ones: no runs, shards or exports), unless the line just above it says
``<!-- readme-test: skip (why) -->``: set-up (the copy's .venv is the running interpreter's venv, so
nothing is installed), servers, GPUs, SLURM. The copy's code is the one that runs (PYTHONPATH), as
after ``pip install -e .`` in a fresh clone.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]+)\) -->")
BLOCK = re.compile(r"^(?:<!-- readme-test: skip \((?P<why>[^)]+)\) -->\n)?```bash\n(?P<body>.*?)^```$",
                   re.MULTILINE | re.DOTALL)


def readme_blocks(text: str) -> list[tuple[str | None, str]]:
    """(reason to skip or None, commands) of every ```bash block, in order."""
    return [(match["why"], match["body"]) for match in BLOCK.finditer(text)]


def test_every_skip_marker_sits_on_a_bash_block():
    """A misspelt or misplaced marker would run a block meant to be skipped (or skip nothing)."""
    text = (ROOT / "README.md").read_text()
    blocks = readme_blocks(text)
    assert text.count("readme-test") == len(SKIP.findall(text)) == sum(why is not None for why, _ in blocks)
    assert text.count("```bash") == len(blocks)
    assert any(why is None for why, _ in blocks)


def _copy_working_tree(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git working tree ({listed.stderr.strip()})")
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not there
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name, follow_symlinks=False)


@pytest.mark.slow
def test_readme_commands_run_in_order_in_a_fresh_copy(tmp_path):
    """Bug caught: README commands that need the venv activated (bare `esolm-sample`) while the set-up
    never activates it."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's commands call .venv/bin/...: run the tests from a virtual environment")
    copy = tmp_path / "esolm-dist"
    _copy_working_tree(copy)
    (copy / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    # as after the set-up command: the venv not activated, MLflow at the README's default store
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep) if part != venv_bin)
    env["PYTHONPATH"] = str(copy)
    for number, (why, body) in enumerate(readme_blocks((ROOT / "README.md").read_text()), start=1):
        if why is not None:
            continue
        started = time.monotonic()
        run = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=copy, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
        tail = "\n".join(run.stdout.splitlines()[-5:])
        print(f"README block {number}: exit {run.returncode} after {time.monotonic() - started:.0f} s: "
              f"{body.splitlines()[0]}\n{tail}")
        if run.returncode != 0:
            pytest.fail(f"README block {number} exited with {run.returncode}:\n{body}\n--- output (tail) ---\n"
                        f"{run.stdout[-4000:]}", pytrace=False)
