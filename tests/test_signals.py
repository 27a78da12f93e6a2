"""SIGTERM mid-run: the trainer finishes its step, saves, exits 0; the resumed run equals an uninterrupted one.

Real processes (``python -m esolm_dist.train``), real signals; losses are read back from MLflow.
The uninterrupted reference runs at the same time as the interrupted run (two single-process runs
share the 2 cores; each is deterministic on its own).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

MAX_STEPS = 12
SIGNAL_AFTER_STEP = 2
TIMEOUT_S = 300
STEP_LINE = re.compile(r"^step\s+(\d+)/\d+ loss ")


def train_command(run_dir: Path, shard_dir: Path) -> list[str]:
    return [sys.executable, "-m", "esolm_dist.train",
            f"train.run_dir={run_dir}", f"data.shard_dir={shard_dir}", f"logging.mlflow_uri=sqlite:///{run_dir}/mlflow.db",
            "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_every=1",
            f"train.max_steps={MAX_STEPS}", "train.save_every=100000", "train.eval_every=100000",
            "train.eval_batches=1", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.ema=0.9"]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**clean, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


def loss_history(run_dir: Path, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


def run_status(run_dir: Path, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db").get_run(run_id).info.status


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, shard_dir):
    from esolm_dist.checkpoint import find_latest, read_meta, tag_for

    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    reference_log = tmp_path / "reference.log"
    with reference_log.open("w") as sink:
        reference = subprocess.Popen(train_command(full_dir, shard_dir), env=env(), stdout=sink,
                                     stderr=subprocess.STDOUT)
    interrupted = subprocess.Popen(train_command(split_dir, shard_dir), env=env(), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
    watchdog = threading.Timer(TIMEOUT_S, interrupted.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    lines, signalled_at = [], None
    try:
        for line in interrupted.stdout:  # the trainer flushes every line it prints
            lines.append(line)
            match = STEP_LINE.match(line)
            if match and signalled_at is None and int(match.group(1)) >= SIGNAL_AFTER_STEP:
                signalled_at = int(match.group(1))
                interrupted.send_signal(signal.SIGTERM)
        code = interrupted.wait(timeout=60)
        reference.wait(timeout=TIMEOUT_S)
    finally:
        watchdog.cancel()
        for proc in (interrupted, reference):
            if proc.poll() is None:
                proc.kill()
    log = "".join(lines)
    assert signalled_at is not None, f"no step line seen:\n{log[-4000:]}"
    assert code == 0, f"SIGTERM exit code {code}:\n{log[-4000:]}"
    assert reference.returncode == 0, reference_log.read_text()[-4000:]

    stopped = re.search(r"stop signal received; saved step (\d+) and exiting", log)
    assert stopped, log[-4000:]
    stop_step = int(stopped.group(1))
    assert signalled_at <= stop_step < MAX_STEPS  # it stopped at the next step boundary, early
    latest = find_latest(split_dir)
    assert latest is not None and latest.name == tag_for(stop_step)
    run_id = read_meta(latest)["mlflow_run_id"]
    assert [s for s, _ in loss_history(split_dir, run_id)] == list(range(1, stop_step + 1))
    assert run_status(split_dir, run_id) == "KILLED"

    resumed = subprocess.run(train_command(split_dir, shard_dir), env=env(), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"at step {stop_step}" in resumed.stdout and f"finished at step {MAX_STEPS}" in resumed.stdout

    assert read_meta(find_latest(split_dir))["mlflow_run_id"] == run_id  # the same MLflow run, continued
    assert run_status(split_dir, run_id) == "FINISHED"
    split = loss_history(split_dir, run_id)
    full = loss_history(full_dir, read_meta(find_latest(full_dir))["mlflow_run_id"])
    assert [s for s, _ in split] == list(range(1, MAX_STEPS + 1)), "steps missing or logged twice"
    for (step, got), (_, want) in zip(split, full, strict=True):
        assert got == want, f"step {step}: resumed run loss {got} != uninterrupted {want}"
