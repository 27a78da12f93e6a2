"""What `sbatch slurm/train_1b.sh` meets in its first hour, minus the GPUs: configs/1b.yaml's data,
ZeRO, bf16, accumulation (512 = 8 x 64 at DP 1), evaluation-with-samples and save settings, the model
shrunk by overrides, on 4 CPU processes (TP2 x PP2 as configured); then a resume in another layout
(TP1 x PP1 x DP4, ZeRO-1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32"]


def launch(tmp_path: Path, *overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m",
               "esolm_dist.train", str(ROOT / "configs" / "1b.yaml"), *TINY_MODEL,
               f"data.shard_dir={tmp_path / 'shards'}", "data.corpus=[bundled]", "data.tokenizer=bundled",
               "parallel.device=cpu", f"train.run_dir={tmp_path / 'run'}",
               f"logging.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


@pytest.mark.slow
def test_the_1b_job_at_tiny_size_trains_saves_and_resumes_in_another_layout(tmp_path):
    first = launch(tmp_path, "train.max_steps=2", "train.save_every=2", "train.eval_every=2")
    assert "esolm-train: finished at step 2" in first
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    meta = json.loads((checkpoint / "esolm.json").read_text())
    assert meta["layout"] == {"tensor": 2, "pipeline": 2, "data": 1}
    cfg = meta["config"]
    assert (cfg["parallel"]["precision"], cfg["parallel"]["zero_stage"], cfg["train"]["global_batch_size"],
            cfg["train"]["micro_batch_size"], cfg["logging"]["samples"]) == ("bf16", 1, 512, 8, 2)
    second = launch(tmp_path, "train.max_steps=3", "train.save_every=3", "train.eval_every=3", "parallel.tensor=1",
                    "parallel.pipeline=1")
    assert "TP2 x PP2 x DP1" in second and "TP1 x PP1 x DP4" in second, second[-3000:]
    assert "esolm-train: finished at step 3" in second
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "esolm.json").read_text())["layout"] == \
        {"tensor": 1, "pipeline": 1, "data": 4}
