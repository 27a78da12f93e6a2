"""Nothing lost, nothing executed: one trainer per run folder, resume=false never mixes runs, pruning
keeps what it must, checkpoint files cannot run code, failures are one line and a FAILED MLflow run."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAINING, tiny_config

from esolm_dist import checkpoint
from esolm_dist.checkpoint import CheckpointError
from esolm_dist.run_lock import LOCK_NAME, RunLockError
from esolm_dist.train import Trainer, main


class _RunsCode:
    """A pickle that, when unpickled by a full unpickler, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(target: Path, marker: Path) -> None:
    """Replace a checkpoint file with a crafted pickle (a dict holding the code-running object)."""
    torch.save({"module": _RunsCode(marker), "rng": _RunsCode(marker)}, target)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, shard_dir, single_process):
    """A 2-step run with one checkpoint (step 2); tests copy it before they change anything."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=2", "train.save_every=2", "logging.samples=0")).fit()
    return run_dir


def _copy_run(saved_run: Path, to: Path) -> Path:
    shutil.copytree(saved_run, to)
    return to


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- one trainer per run folder ----------------------------------------------------------------

def test_second_trainer_is_refused_naming_the_holder(tmp_path, shard_dir, single_process):
    """Bug caught: two trainers sharing a run folder (each pruning the other's checkpoints)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(RunLockError) as info:
            Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=1"))
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "\n" not in message
        assert not checkpoint.has_checkpoints(run_dir)
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # the holder keeps it
    finally:
        holder.kill()
        holder.wait()


def test_live_trainer_holds_the_lock_and_releases_it(tmp_path, shard_dir, single_process):
    """Bug caught: a lock that is not taken at start-up, or never released (the next run is refused)."""
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=1", "logging.samples=0"))
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockError, match="in use by another trainer"):
        Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=1"))
    trainer.fit()
    assert not (run_dir / LOCK_NAME).exists()
    Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=1", "logging.samples=0")).fit()  # not refused


def test_stale_lock_is_taken_over_and_said(tmp_path, shard_dir, single_process, capsys, monkeypatch):
    """Bug caught: a crashed run's lock blocking every later start (dead pid on this host; an earlier
    start of the same SLURM job after a hard kill and requeue)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=1", "logging.samples=0")).fit()
    assert f"took over the stale lock {run_dir / LOCK_NAME} (pid {dead.pid}" in capsys.readouterr().out

    (run_dir / LOCK_NAME).write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job_id": "77",
                                                 "slurm_restart_count": None}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=2", "logging.samples=0")).fit()
    assert "an earlier start of SLURM job 77" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job's lock on another node: never taken over
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job_id": "77"}))
    with pytest.raises(RunLockError, match="pid 1 on host another-node, SLURM job 77"):
        Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=3"))


# ---- resume=false, overwrite, pruning ----------------------------------------------------------

def test_resume_false_refuses_then_overwrite_moves_aside(saved_run, tmp_path, shard_dir, single_process):
    """Bug caught: resume=false in a folder with checkpoints (the old step_00000400 outranking the new
    step_00000002 in name order: each new save deleted right after it was written, latest naming nothing)."""
    run_dir = _copy_run(saved_run, tmp_path / "run")
    old = _files(run_dir / "checkpoints")
    # rename the old step so that it sorts after every new one, as a long earlier run would
    os.replace(run_dir / "checkpoints" / "step_00000002", run_dir / "checkpoints" / "step_00000400")
    (run_dir / "checkpoints" / "latest").write_text("step_00000400")
    with pytest.raises(CheckpointError, match=r"train\.resume=false would start a new run among them; set "
                                              r"train\.resume=true to continue it, train\.overwrite=true"):
        Trainer(tiny_config(run_dir, shard_dir, "train.resume=false"))
    assert (run_dir / "checkpoints" / "step_00000400").is_dir()

    state = Trainer(tiny_config(run_dir, shard_dir, "train.resume=false", "train.overwrite=true", "train.max_steps=3",
                                "train.save_every=1", "train.keep_last=1", "logging.samples=0")).fit()
    assert state.step == 3
    latest = checkpoint.find_latest(run_dir)
    assert latest.name == "step_00000003" and checkpoint.read_meta(latest)["step"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000003"]
    aside = [p for p in run_dir.iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1
    moved = _files(aside[0])
    assert moved["latest"] == b"step_00000400"
    assert {k.replace("step_00000400", "step_00000002"): v for k, v in moved.items() if k != "latest"} == \
        {k: v for k, v in old.items() if k != "latest"}


def test_pruning_keeps_other_runs_and_later_steps(tmp_path):
    """Bug caught: pruning by name order across runs, or deleting the step just saved."""
    root = tmp_path / "checkpoints"
    for step, uid in [(1, "me"), (2, "me"), (3, "me"), (5, "me"), (400, "other"), (4, None)]:
        folder = root / checkpoint.tag_for(step)
        folder.mkdir(parents=True)
        (folder / checkpoint.META).write_text(json.dumps({"step": step, "run_uid": uid}))
    (root / "step_00000006.partial").mkdir()
    checkpoint._prune(root, keep_last=2, run_uid="me", saved_step=3)
    checkpoint.wait_for_pruning()
    # of "me" up to step 3 the newest two stay; step 5 (later), 400 (other run), 4 (no uid) stay
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003", "step_00000004",
                                                      "step_00000005", "step_00000400"]


def test_pruning_returns_before_the_old_checkpoints_are_deleted(tmp_path, monkeypatch):
    """Bug caught: rank 0 deleting old checkpoints inside save(), stalling every rank at the barrier."""
    import threading

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        (root / checkpoint.tag_for(step)).mkdir(parents=True)
        (root / checkpoint.tag_for(step) / checkpoint.META).write_text(json.dumps({"step": step, "run_uid": "me"}))
    release, rmtree = threading.Event(), shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path, **kw: (release.wait(10), rmtree(path, **kw)))
    checkpoint._prune(root, keep_last=1, run_uid="me", saved_step=2)  # returns while the deletion is held
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001.pruned", "step_00000002"]
    assert checkpoint._step_dirs(root).keys() == {2}  # a folder being deleted is never read as a checkpoint
    release.set()
    checkpoint.wait_for_pruning()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


# ---- no code runs from a checkpoint -------------------------------------------------------------

def test_crafted_pickle_is_refused_by_resume_export_and_init_from(saved_run, tmp_path, shard_dir, single_process):
    """Bug caught: torch.load(weights_only=False) on checkpoint files (ours or DeepSpeed's) executing pickled
    code: the marker file would be created."""
    from esolm_dist.convert_cli import main as convert_main

    marker = tmp_path / "pwned"
    resume_dir = _copy_run(saved_run, tmp_path / "resume")
    _plant(resume_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"refusing to load .*step_00000002: it asks to run or build "
                                              r"\S+, which is not checkpoint data"):
        Trainer(tiny_config(resume_dir, shard_dir, "train.max_steps=3")).fit()
    rank_dir = _copy_run(saved_run, tmp_path / "rank")
    _plant(rank_dir / "checkpoints" / "step_00000002" / "rank_00000.pt", marker)
    with pytest.raises(CheckpointError, match=r"refusing to load .*rank_00000\.pt"):
        Trainer(tiny_config(rank_dir, shard_dir, "train.max_steps=3")).fit()

    export_dir = _copy_run(saved_run, tmp_path / "export")
    _plant(export_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", marker)
    assert convert_main(["export", "--checkpoint", str(export_dir / "checkpoints" / "latest"),
                         "--out", str(tmp_path / "out")]) == 2
    assert main([*TINY_TRAINING, f"train.run_dir={tmp_path / 'warm'}", f"data.shard_dir={shard_dir}",
                 f"train.init_from={export_dir / 'checkpoints' / 'latest'}"]) == 2
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # the same kind of file is really dangerous: a plain torch.load would have run it
    torch.load(export_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


def test_checkpoints_load_weights_only(saved_run):
    """Bug caught: our rank file needing numpy globals (or any pickled class) to load. Asked of a fresh
    interpreter: megatron-core allowlists numpy globals process-wide when it is imported."""
    files = sorted((saved_run / "checkpoints" / "step_00000002").glob("*.pt"))
    assert [p.name for p in files] == ["mp_rank_00_model_states.pt", "rank_00000.pt"]
    script = "import sys, torch; print([torch.serialization.get_unsafe_globals_in_checkpoint(f) for f in sys.argv[1:]])"
    out = subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[], []]"


def test_zero_optimizer_files_resume_weights_only(tmp_path, shard_dir, single_process):
    """Bug caught: an allowlist too short for DeepSpeed's own ZeRO optimizer files (bf16 ZeRO-1 and ZeRO-2
    store a loss scaler, a stage enum and fragment addresses): esolm-train refusing its own checkpoints."""
    for name, extra in (("bf16_zero1", ["parallel.zero_stage=1", "parallel.precision=bf16"]),
                        ("zero2", ["parallel.zero_stage=2"])):
        run_dir = tmp_path / name
        Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=2", "train.save_every=2", "logging.samples=0",
                            *extra)).fit()
        assert list((run_dir / "checkpoints" / "step_00000002").glob("*optim_states.pt"))
        resumed = Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=3", "logging.samples=0", *extra)).fit()
        assert resumed.history[0]["step"] == 3


# ---- resume in a run that does not fit -------------------------------------------------------------

def test_resume_of_another_model_size_names_the_keys(saved_run, tmp_path, shard_dir, single_process):
    """Bug caught: a checkpoint of another size reported as 'truncated or corrupt'."""
    run_dir = _copy_run(saved_run, tmp_path / "run")
    with pytest.raises(CheckpointError) as info:
        Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=3", "model.hidden_size=64")).fit()
    assert "model.hidden_size=32 (this run: 64)" in str(info.value) and "corrupt" not in str(info.value)


def test_foreign_or_damaged_meta_is_one_line(saved_run, tmp_path, capsys):
    """Bug caught: convert.py parsing esolm.json unguarded (a JSON traceback, a KeyError)."""
    from esolm_dist.convert_cli import main as convert_main

    run_dir = _copy_run(saved_run, tmp_path / "run")
    meta = run_dir / "checkpoints" / "step_00000002" / checkpoint.META
    for content in ("{not json", json.dumps({"step": 2})):
        meta.write_text(content)
        assert convert_main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(meta) in err[0], err


# ---- failures reach the user as one line; MLflow knows ------------------------------------------------

def test_diverging_run_is_one_line_and_a_failed_mlflow_run(tmp_path, shard_dir, single_process, capsys):
    """Bug caught: FloatingPointError as a traceback, the MLflow run left RUNNING, the lock left behind."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    assert main([*TINY_TRAINING, f"train.run_dir={run_dir}", f"data.shard_dir={shard_dir}",
                 f"logging.mlflow_uri=sqlite:///{run_dir}/mlflow.db", "optim.lr=1e30", "optim.warmup_steps=0",
                 "optim.grad_clip=0", "logging.samples=0", "train.max_steps=20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"esolm-train: error: loss is (nan|inf) at step \d+; lower optim.lr", err), err
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("esolm").experiment_id])
    assert run.info.status == "FAILED"
    assert not (run_dir / LOCK_NAME).exists()


def test_resume_against_another_store_starts_a_new_mlflow_run(saved_run, tmp_path, shard_dir, single_process,
                                                              capsys):
    """Bug caught: MLflow's 'run not found' traceback when the run folder moved or the store changed."""
    from mlflow.tracking import MlflowClient

    run_dir = _copy_run(saved_run, tmp_path / "moved")
    old_id = checkpoint.read_meta(checkpoint.find_latest(run_dir))["mlflow_run_id"]
    new_store = f"sqlite:///{tmp_path}/elsewhere.db"
    state = Trainer(tiny_config(run_dir, shard_dir, "train.max_steps=3", "logging.samples=0",
                                f"logging.mlflow_uri={new_store}")).fit()
    assert state.step == 3 and state.mlflow_run_id != old_id
    assert f"MLflow run {old_id} of the checkpoint is not in {new_store}" in capsys.readouterr().out
    steps = [m.step for m in MlflowClient(tracking_uri=new_store).get_metric_history(state.mlflow_run_id, "train/loss")]
    assert steps == [3]


def test_single_process_rendezvous_listens_on_loopback_only(single_process):
    """Bug caught: the private rendezvous store of a one-process run listening on every interface."""
    import ipaddress

    import psutil

    listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert all(ipaddress.ip_address(ip).is_loopback for ip in listening), listening


def test_two_trainers_can_open_a_fresh_sqlite_store_at_once(tmp_path):
    """Bug caught: two runs creating a new sqlite MLflow store at the same time (one crashed inside MLflow)."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from esolm_dist.config import load_config\n"
        "from esolm_dist.monitor import MlflowMonitor\n"
        "run = Path(sys.argv[1]); run.mkdir()\n"
        "cfg = load_config(None, [f'train.run_dir={run}', f'logging.mlflow_uri=sqlite:///{sys.argv[2]}'])\n"
        "(run / 'config.yaml').write_text('x: 1')\n"
        "MlflowMonitor(cfg, None, run / 'config.yaml', {}).close('FINISHED')\n")
    for attempt in range(2):
        store = tmp_path / f"store{attempt}" / "mlflow.db"
        store.parent.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"run{attempt}{i}"), str(store)],
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]


def test_tool_arguments_are_checked(saved_run, tmp_path, capsys):
    """Bug caught: tools accepting impossible numbers (a traceback or garbage later) or running without
    a required argument."""
    from esolm_dist.convert import export
    from esolm_dist.convert_cli import main as convert_main
    from esolm_dist.inference.cli import main as sample_main
    from esolm_dist.inference.likelihood import main as likelihood_main

    model = str(export(saved_run / "checkpoints" / "latest", tmp_path / "export"))
    capsys.readouterr()
    for bad, message in ((["--steps", "0"], "--steps must be >= 1, got 0"),
                         (["--top-p", "1.5"], "--top-p must lie in (0, 1], got 1.5"),
                         (["--alpha0", "-0.5"], "--alpha0 must lie in [0, 1], got -0.5")):
        assert sample_main(["--model", model, "--length", "8", *bad]) == 2
        assert capsys.readouterr().err.strip() == f"esolm-sample: error: {message}"
    for bad, message in ((["--orders", "0"], "--orders must be >= 1, got 0"),
                         (["--batches", "-1"], "--batches must be >= 1, got -1")):
        with pytest.raises(SystemExit) as info:
            likelihood_main(["--model", model, "--shards", str(tmp_path), *bad])
        assert info.value.code == 2 and message in capsys.readouterr().err
    for argv in (["export", "--checkpoint", str(saved_run)], ["export", "--out", str(tmp_path / "x")]):
        with pytest.raises(SystemExit) as info:
            convert_main(argv)
        assert info.value.code == 2 and "the following arguments are required" in capsys.readouterr().err
