"""Single-process training: reproducible, exactly resumable, loss decreases, MLflow continued on resume."""

import torch
from conftest import tiny_config

from esolm_dist.train import Trainer


def losses(state, key="train/loss"):
    return {h["step"]: h[key] for h in state.history if key in h}


def test_same_seed_same_losses_and_resume_is_exact(single_process, tmp_path, shard_dir):
    full = Trainer(tiny_config(tmp_path / "full", shard_dir, "train.max_steps=8")).fit()
    again = Trainer(tiny_config(tmp_path / "again", shard_dir, "train.max_steps=8")).fit()
    assert losses(full) == losses(again)  # bitwise: same seed, same config

    Trainer(tiny_config(tmp_path / "split", shard_dir, "train.max_steps=4")).fit()
    resumed = Trainer(tiny_config(tmp_path / "split", shard_dir, "train.max_steps=8")).fit()
    assert resumed.history[0]["step"] == 5  # it resumed, it did not start over
    for step, loss in losses(resumed).items():
        assert loss == losses(full)[step], f"step {step}: resumed {loss} != uninterrupted {losses(full)[step]}"
    assert losses(resumed, "val/nelbo")[8] == losses(full, "val/nelbo")[8]
    assert resumed.mlflow_run_id == Trainer.last_run_id_of(tmp_path / "split")


def test_mlflow_run_is_continued_without_duplicate_steps(single_process, tmp_path, shard_dir):
    from mlflow.tracking import MlflowClient

    first = Trainer(tiny_config(tmp_path / "run", shard_dir, "train.max_steps=4")).fit()
    second = Trainer(tiny_config(tmp_path / "run", shard_dir, "train.max_steps=6")).fit()
    assert first.mlflow_run_id == second.mlflow_run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/run/mlflow.db")
    steps = [m.step for m in client.get_metric_history(first.mlflow_run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    run = client.get_run(first.mlflow_run_id)
    assert run.data.params["eso.alpha0"] == "0.25" and run.info.status == "FINISHED"
    for key in ("train/loss_diffusion", "train/loss_sequential", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/mfu", "train/step_time_s", "train/tokens_seen", "val/nelbo", "val/loss_diffusion",
                "val/loss_sequential", "summary/tokens_per_s", "summary/best_val_nelbo"):
        assert key in run.data.metrics, key
    samples = [a.path for a in client.list_artifacts(first.mlflow_run_id, "samples")]
    assert "samples/step_00000006.txt" in samples and "samples/step_00000000.txt" in samples
    text = client.download_artifacts(first.mlflow_run_id, "samples/step_00000006.txt", str(tmp_path))
    assert "--- sample 1 ---" in open(text).read()


def test_loss_decreases_and_ema_tracks(single_process, tmp_path, shard_dir):
    trainer = Trainer(tiny_config(tmp_path / "learn", shard_dir, "train.max_steps=30", "train.eval_every=30",
                                  "optim.ema=0.9"))
    state = trainer.fit()
    val = losses(state, "val/nelbo")
    assert val[30] < 0.85 * val[0], val
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in state.history if "train/loss" in h)
    live = dict(trainer.engine.module.named_parameters())
    for name, shadow in trainer.ema.shadow.items():
        # one process holds the whole EMA, as one flat slice (esolm_dist.ema)
        assert shadow.numel() == live[name].numel() and not torch.equal(shadow.view_as(live[name]), live[name].detach())


def test_zero_offload_and_bf16_train_like_fp32(single_process, tmp_path, shard_dir):
    """ZeRO-2 with the optimizer offloaded to the CPU (DeepSpeed's CPU Adam, JIT-built on first use) and bf16
    with ZeRO-1 follow the plain fp32 run. Tolerances: CPU Adam fuses the update differently (rel 1e-4 on
    the loss after 3 steps); bf16 rounds activations and weights (rel 2e-2)."""
    plain = losses(Trainer(tiny_config(tmp_path / "plain", shard_dir, "train.max_steps=3", "logging.samples=0")).fit())
    offload = losses(Trainer(tiny_config(tmp_path / "offload", shard_dir, "train.max_steps=3", "logging.samples=0",
                                         "parallel.zero_stage=2", "parallel.cpu_offload=true")).fit())
    bf16 = losses(Trainer(tiny_config(tmp_path / "bf16", shard_dir, "train.max_steps=3", "logging.samples=0",
                                      "parallel.zero_stage=1", "parallel.precision=bf16")).fit())
    assert offload.keys() == bf16.keys() == plain.keys() == {1, 2, 3}
    for step, loss in plain.items():
        assert abs(offload[step] - loss) <= 1e-4 * loss, (step, offload[step], loss)
        assert abs(bf16[step] - loss) <= 2e-2 * loss, (step, bf16[step], loss)


def test_mlflow_has_system_metrics_tags_and_a_samples_table(single_process, tmp_path, shard_dir):
    """What a user opens in MLflow: system metrics (MLflow's own monitor), provenance tags, a training
    experiment, metrics grouped train/ and val/, and one samples table across evaluations."""
    import json
    import socket

    from mlflow.tracking import MlflowClient

    state = Trainer(tiny_config(tmp_path / "run", shard_dir, "train.max_steps=8", "logging.system_metrics_s=1",
                                "train.log_every=4")).fit()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/run/mlflow.db")
    run = client.get_run(state.mlflow_run_id)
    system = [key for key in run.data.metrics if key.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system, system
    tags = run.data.tags
    assert tags["esolm.layout"] == "TP1 x PP1 x DP1" and tags["esolm.nodes"] == "1"
    assert tags["esolm.host"] == socket.gethostname() and tags["esolm.version.torch"] == torch.__version__
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["esolm.git_dirty"] in ("true", "false")
    assert tags["esolm.command"]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert {k.split("/")[0] for k in run.data.metrics} == {"train", "val", "system", "summary"}
    table = json.load(open(client.download_artifacts(state.mlflow_run_id, "samples.json", str(tmp_path))))
    steps = [row[table["columns"].index("step")] for row in table["data"]]
    assert steps == [0, 0, 4, 4, 8, 8]  # 2 samples at each evaluation (eval_every=4)
