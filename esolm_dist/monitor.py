"""MLflow logging from one rank: one run per training run, continued on resume.

Metrics are grouped ``train/...`` and ``val/...``; MLflow's own system-metrics monitor logs
``system/...`` (CPU, memory, disk, network; GPU utilisation and memory with nvidia-ml-py) every
``logging.system_metrics_s`` seconds; tags record where the run came from (esolm_dist.provenance);
the experiment is marked as model training so MLflow 3 opens its training view.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from esolm_dist.config import RunConfig, flatten, to_dict


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store; None for a tracking server."""
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def _prepare_sqlite_dir(database: Path) -> str:
    """Create the database's folder; returns where artifacts go (beside the database, not ./mlruns)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    return (database.parent / "mlartifacts").as_uri()


@contextmanager
def _store_setup_lock(database: Path):
    """Two trainers opening a new sqlite store at once would both create its tables (one crashes
    inside MLflow): the first to take this lock creates the store and experiment, the other waits."""
    with open(database.with_suffix(".setup-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: a training experiment
LOSS_METRIC = "train/loss"
SAMPLES_TABLE = "samples.json"


class MlflowMonitor:
    """Logs metrics every N steps; on resume it reopens the run and never logs a step twice."""

    def __init__(self, cfg: RunConfig, run_id: str | None, config_yaml: Path, tags: dict[str, str]):
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no calls home from training jobs
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI", cfg.logging.mlflow_uri)
        database = _sqlite_file(uri)
        artifact_location = _prepare_sqlite_dir(database) if database else None  # else the server decides
        self.uri = uri
        self.notice = None  # said once by the trainer
        with _store_setup_lock(database) if database else nullcontext():
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(cfg.logging.experiment)
            if experiment is None:
                experiment_id = self.client.create_experiment(cfg.logging.experiment, artifact_location=artifact_location,
                                                              tags=dict([EXPERIMENT_KIND]))
            else:
                experiment_id = experiment.experiment_id
                if EXPERIMENT_KIND[0] not in experiment.tags:
                    self.client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        if run_id is not None and not self._has_run(run_id):
            self.notice = (f"MLflow run {run_id} of the checkpoint is not in {uri} (a moved run folder or a changed "
                           "logging.mlflow_uri); logging to a new MLflow run, the old run stays in its own store")
            run_id = None
        if run_id is None:
            name = cfg.logging.run_name or Path(cfg.train.run_dir).name
            run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start:start + 100])
            self.client.log_artifact(run_id, str(config_yaml))
            self.resumed_through = -1
        else:
            self.client.update_run(run_id, status="RUNNING")
            for key, value in tags.items():  # this start's command line, hosts and versions
                self.client.set_tag(run_id, key, value)
            history = self.client.get_metric_history(run_id, LOSS_METRIC)
            # Steps the run logged before it was interrupted are recomputed identically after the
            # resume; they are already in the run, so they are not logged again.
            self.resumed_through = max((m.step for m in history), default=-1)
        self.run_id = run_id
        self.system_metrics = None
        if cfg.logging.system_metrics_s > 0:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.system_metrics = SystemMetricsMonitor(run_id, sampling_interval=cfg.logging.system_metrics_s,
                                                       resume_logging=self.resumed_through >= 0, tracking_uri=uri)
            self.system_metrics.start()

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

    def log_samples(self, texts: list[str], step: int) -> None:
        """One text file per evaluation, and one table of every evaluation's samples (step, sample, text)
        that MLflow's artifact view filters and compares across steps and runs."""
        body = "\n\n".join(f"--- sample {i} ---\n{text}" for i, text in enumerate(texts))
        self.log_text(body, f"samples/step_{step:08d}.txt")
        if step > self.resumed_through:
            self.client.log_table(self.run_id, data={"step": [step] * len(texts), "sample": list(range(len(texts))),
                                                     "text": texts}, artifact_file=SAMPLES_TABLE)

    def log_summary(self, summary: dict[str, float], step: int) -> None:
        """summary/... at the step the session ended (a resumed run adds its next session's summary)."""
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(f"summary/{k}", float(v), now, step)
                                                    for k, v in summary.items()])

    def close(self, status: str) -> None:
        """FINISHED (max_steps reached), KILLED (stopped by a signal, resumable) or FAILED (an error)."""
        if self.system_metrics is not None:
            monitor, self.system_metrics = self.system_metrics, None
            monitor.finish()
            # one last sample, so that a session shorter than one interval has system metrics too
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        self.client.set_terminated(self.run_id, status=status)
