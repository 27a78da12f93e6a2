"""MLflow logging from one rank: one run per training run, continued on resume."""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from esolm_dist.config import RunConfig, flatten, to_dict


def _prepare_sqlite_dir(uri: str) -> str | None:
    """Create the database's folder; returns where artifacts go (beside the database, not ./mlruns)."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides
    folder = Path(uri[len("sqlite:///"):]).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / "mlartifacts").as_uri()


@contextmanager
def _store_setup_lock(uri: str):
    """Two trainers opening a new sqlite store at once would both create its tables (one crashes
    inside MLflow): the first to take this lock creates the store and experiment, the other waits."""
    with open(Path(uri[len("sqlite:///"):]).resolve().with_suffix(".setup-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class MlflowMonitor:
    """Logs metrics every N steps; on resume it reopens the run and never logs a step twice."""

    def __init__(self, cfg: RunConfig, run_id: str | None, config_yaml: Path):
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI", cfg.logging.mlflow_uri)
        artifact_location = _prepare_sqlite_dir(uri)
        self.uri = uri
        self.notice = None  # said once by the trainer
        with _store_setup_lock(uri) if artifact_location else nullcontext():
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(cfg.logging.experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(cfg.logging.experiment, artifact_location=artifact_location))
        if run_id is not None and not self._has_run(run_id):
            self.notice = (f"MLflow run {run_id} of the checkpoint is not in {uri} (a moved run folder or a changed "
                           "logging.mlflow_uri); logging to a new MLflow run, the old run stays in its own store")
            run_id = None
        if run_id is None:
            name = cfg.logging.run_name or Path(cfg.train.run_dir).name
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start:start + 100])
            self.client.log_artifact(run_id, str(config_yaml))
            self.resumed_through = -1
        else:
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "loss")
            # Steps the run logged before it was interrupted are recomputed identically after the
            # resume; they are already in the run, so they are not logged again.
            self.resumed_through = max((m.step for m in history), default=-1)
        self.run_id = run_id

    def _has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log metrics at ``step``; steps already in the run from before a resume are skipped."""
        if step <= self.resumed_through:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def close(self, status: str) -> None:
        """FINISHED (max_steps reached), KILLED (stopped by a signal, resumable) or FAILED (an error)."""
        self.client.set_terminated(self.run_id, status=status)
