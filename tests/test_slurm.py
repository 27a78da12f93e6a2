"""End to end on a real SLURM cluster (two slurmd on this machine, tests/slurm_cluster.py): the real
``slurm/train_1b.sh`` with its CPU override, submitted with ``sbatch -p debug -N 2``.

- A 2-node job (1 process per node, DP=2 on gloo) trains N steps, ends COMPLETED, and its losses
  equal the same config launched with ``torchrun --standalone --nproc_per_node 2`` on one node.
- SIGUSR1 to the batch shell (``scancel -b --signal=USR1``, what ``--signal=B:USR1@600`` sends
  before the time limit) mid-run: the job checkpoints, requeues itself (SLURM_RESTART_COUNT=1),
  resumes, finishes COMPLETED with the uninterrupted run's losses, and its one MLflow run holds
  every step once. The same for a signal that arrives while the processes are still starting.
- A job whose checkpoint directory cannot be written fails at start-up with a message naming it.

Runs as root only (it starts munged/slurmctld/slurmd); skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train_1b.sh"
MAX_STEPS = 60
STOP_AFTER_STEP = 5
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.micro_batch_size=4", "train.global_batch_size=8", f"train.max_steps={MAX_STEPS}", "train.log_every=1",
        "train.eval_every=1000", "train.eval_batches=2", "train.save_every=1000", "optim.warmup_steps=2"]
CPU_ON_TWO_NODES = ["-p", "debug", "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0"]
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-shards")


def job_env(run_dir: Path, shard_dir: Path) -> dict[str, str]:
    """The CPU override of slurm/train_1b.sh: quickstart config on gloo, tiny model, own run dir + MLflow."""
    return {
        "ESOLM_DEVICE": "cpu",
        "ESOLM_PYTHON": sys.executable,
        "ESOLM_RUN_DIR": str(run_dir),
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir}/mlflow.db",
        "ESOLM_OVERRIDES": " ".join([f"data.shard_dir={shard_dir}", *TINY]),
        "OMP_NUM_THREADS": "1",  # as torchrun sets it: the same threads give the same sums
        "DS_ACCELERATOR": "cpu",
    }


def mlflow_history(run_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(run id, {metric: [(step, value)] in logging order}) of the MLflow run named in the latest checkpoint."""
    from mlflow.tracking import MlflowClient

    root = run_dir / "checkpoints"
    run_id = json.loads((root / (root / "latest").read_text().strip() / "esolm.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(run_id)
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one training run: {[r.info.run_id for r in runs]}"
    history = {}
    for key in run.data.metrics:
        metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
        history[key] = [(m.step, m.value) for m in metrics]
    return run_id, history


def assert_same_training(run_dir: Path, reference: dict[str, dict[int, float]], what: str) -> None:
    """Every step logged once, and the losses (and final validation NELBO) equal the reference's, bitwise."""
    run_id, history = mlflow_history(run_dir)
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"MLflow run {run_id}: {key} logged twice at some step: {steps}"
    assert [step for step, _ in history["train/loss"]] == list(range(1, MAX_STEPS + 1))
    for key in ("train/loss", "train/loss_diffusion", "train/loss_sequential", "val/nelbo"):
        for step, value in history[key]:
            assert value == reference[key][step], f"{key} at step {step}: {what} {value} != torchrun {reference[key][step]}"


@pytest.fixture(scope="module")
def torchrun_metrics(tmp_path_factory, shard_dir):
    """The same config on one node: torchrun --standalone --nproc_per_node 2 (also builds the shards)."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    # a clean launch: nothing of this test process's own rendezvous or rank may leak into torchrun's
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env = {**inherited, **job_env(run_dir, shard_dir)}
    env.pop("MLFLOW_TRACKING_URI")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "esolm_dist.train", "configs/quickstart.yaml", "parallel.device=cpu", "parallel.backend=gloo",
               f"train.run_dir={run_dir}", f"logging.mlflow_uri=sqlite:///{run_dir}/mlflow.db",
               f"data.shard_dir={shard_dir}", *TINY]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, f"torchrun reference failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    _, history = mlflow_history(run_dir)
    assert [step for step, _ in history["train/loss"]] == list(range(1, MAX_STEPS + 1))
    return {key: dict(points) for key, points in history.items()}


def submit(cluster, tmp_path: Path, env: dict[str, str]) -> tuple[int, Path]:
    """sbatch the real script from a submit folder of its own; returns the job id and its log file."""
    submit_dir = tmp_path / "submit"
    (submit_dir / "slurm" / "logs").mkdir(parents=True)  # the script logs to slurm/logs/%x-%j.out
    job_id = cluster.submit(SCRIPT, *CPU_ON_TWO_NODES, env=env, cwd=submit_dir)
    return job_id, submit_dir / "slurm" / "logs" / f"esolm-1b-{job_id}.out"


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def assert_completed(record: dict[str, str], log: Path) -> None:
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", (
        f"job {record['JobId']} ended {record['JobState']} (exit {record['ExitCode']}):\n{read_log(log)[-4000:]}")


def test_two_node_job_completes_with_the_torchrun_metrics(slurm_cluster, tmp_path, shard_dir,  # noqa: F811
                                                         torchrun_metrics):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    job_id, log = submit(slurm_cluster, tmp_path, job_env(run_dir, shard_dir))
    record = slurm_cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    assert_completed(record, log)
    print(f"2-node job {job_id} COMPLETED in {time.monotonic() - started:.0f} s")

    text = read_log(log)
    assert "restart 0 on n[1-2]: 2 node(s) x 1 task(s)" in text, text[-3000:]
    assert f"esolm-train: finished at step {MAX_STEPS}" in text
    assert record["Restarts"] == "0"
    root = run_dir / "checkpoints"
    meta = json.loads((root / (root / "latest").read_text().strip() / "esolm.json").read_text())
    assert meta["world_size"] == 2 and meta["layout"] == {"tensor": 1, "pipeline": 1, "data": 2}

    assert_same_training(run_dir, torchrun_metrics, "sbatch")


def test_signalled_job_checkpoints_requeues_and_finishes_exactly(slurm_cluster, tmp_path, shard_dir,  # noqa: F811
                                                                  torchrun_metrics):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    job_id, log = submit(slurm_cluster, tmp_path, job_env(run_dir, shard_dir))

    def trained_a_few_steps(record: dict[str, str]) -> bool:
        assert record["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job_id} ended {record['JobState']} before it was signalled:\n{read_log(log)[-3000:]}")
        return re.search(rf"^step +{STOP_AFTER_STEP}/\d+ loss", read_log(log), re.M) is not None

    slurm_cluster.wait_until(job_id, trained_a_few_steps, JOB_TIMEOUT_S, poll_s=0.2)
    # What --signal=B:USR1@600 sends before the time limit: SIGUSR1 to the batch shell only.
    slurm_cluster.run("scancel", "-b", "--signal=USR1", str(job_id))
    record = slurm_cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    assert_completed(record, log)
    print(f"signalled job {job_id} COMPLETED after a requeue in {time.monotonic() - started:.0f} s")

    text = read_log(log)
    assert record["Restarts"] == "1", f"expected one requeue, got Restarts={record['Restarts']}:\n{text[-4000:]}"
    stopped = re.search(r"stop signal received; saved step (\d+) and exiting", text)
    assert stopped, f"no checkpoint on the signal:\n{text[-4000:]}"
    saved = int(stopped.group(1))
    assert STOP_AFTER_STEP <= saved < MAX_STEPS, f"the signal arrived after the run ended (saved step {saved})"
    assert f"requeueing job {job_id}" in text
    assert f"job {job_id} (esolm-1b) restart 1 on n[1-2]" in text  # SLURM_RESTART_COUNT=1 in the requeued job
    assert re.search(rf"resumed from \S+step_{saved:08d} at step {saved}\b", text), text[-4000:]
    assert f"esolm-train: finished at step {MAX_STEPS}" in text

    assert_same_training(run_dir, torchrun_metrics, "requeued run")


def test_unwritable_checkpoint_dir_fails_at_start(slurm_cluster, tmp_path, shard_dir):  # noqa: F811
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run directory should be\n")  # unwritable even for root
    run_dir = blocker / "run"
    job_id, log = submit(slurm_cluster, tmp_path, job_env(run_dir, shard_dir))
    record = slurm_cluster.wait_finished(job_id, 120)
    text = read_log(log)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", f"{record}\n{text[-3000:]}"
    assert f"checkpoint directory {run_dir}/checkpoints is not writable" in text, text[-3000:]
    assert "esolm-train" not in text  # it stopped before launching the training processes
    hours, minutes, seconds = (int(part) for part in record["RunTime"].split(":"))
    assert hours * 3600 + minutes * 60 + seconds < 30, f"it failed after {record['RunTime']}, not at start-up"
    assert record["Restarts"] == "0"


def test_signal_during_start_up_still_checkpoints_and_requeues(slurm_cluster, tmp_path, shard_dir,  # noqa: F811
                                                                 torchrun_metrics):
    """A signal before esolm-train has its handler (imports, JIT builds) must not kill the processes:
    they start with SIGUSR1 ignored and the batch script repeats the signal until it is taken."""
    run_dir = tmp_path / "run"
    # A slow task start (a loaded node, a slow shared filesystem), made certain: each task's wrapper
    # shell (named esolm-train) first sources $BASH_ENV, which sleeps before the shell reaches its trap.
    slow_start = tmp_path / "slow_task_start.sh"
    slow_start.write_text('case "$0" in esolm-train) sleep 3 ;; esac\n')
    env = {**job_env(run_dir, shard_dir), "ESOLM_STOP_RESEND_S": "1", "BASH_ENV": str(slow_start)}
    job_id, log = submit(slurm_cluster, tmp_path, env)
    # the batch script logs "rendezvous" just before it runs srun: the signal reaches srun while its
    # tasks are still starting, before their shells have set SIGUSR1 to ignored
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "] rendezvous " not in read_log(log):
        assert time.monotonic() < deadline, f"job {job_id} did not reach srun:\n{read_log(log)[-4000:]}"
        time.sleep(0.02)
    assert not re.search(r"^step +\d+ loss", read_log(log), re.M), "too late: training had already started"
    slurm_cluster.run("scancel", "-b", "--signal=USR1", str(job_id))
    record = slurm_cluster.wait_finished(job_id, JOB_TIMEOUT_S)
    assert_completed(record, log)
    text = read_log(log)
    assert record["Restarts"] == "1", f"expected one requeue, got Restarts={record['Restarts']}:\n{text[-4000:]}"
    assert "User defined signal" not in text, text[-4000:]  # no process was killed by the early signal
    assert re.search(r"stop signal received; saved step \d+ and exiting", text), text[-4000:]
    assert_same_training(run_dir, torchrun_metrics, "requeued run")
