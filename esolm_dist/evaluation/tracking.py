"""One MLflow run per evaluation: the settings as params, each setting's numbers as metrics (step = T),
the result files as artifacts, and tags naming the export and the MLflow run that trained it."""

from __future__ import annotations

import os
import time
from pathlib import Path

EXPERIMENT = "esolm-eval"
DEFAULT_URI = "sqlite:///runs/mlflow.db"  # the training runs' default store (logging.mlflow_uri)
METRICS = ("gen_ppl", "entropy", "nfe", "seconds")


def tracking_uri(flag: str | None) -> str:
    """--mlflow-uri, else MLFLOW_TRACKING_URI, else the training default."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def log_evaluation(uri: str, params: dict, rows: list[dict], files: list[Path],
                   training_run: tuple[str, str] | None) -> str:
    """Create the run, log everything, finish it; returns its id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    tags = {"esolm.export": str(params["model"]), "esolm.evaluator": str(params["evaluator"])}
    if training_run is not None:
        tags["esolm.training_run_id"], tags["esolm.training_tracking_uri"] = training_run
    run_id = client.create_run(experiment_id, run_name=f"eval {Path(params['model']).name}", tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in params.items()])
    now = int(time.time() * 1000)
    metrics = [Metric(f"{row['method']}_alpha0_{row['alpha0']:g}/{name}", float(row[name]), now, row["steps"])
               for row in rows for name in METRICS]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
