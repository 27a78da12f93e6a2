"""The MLflow run: opened on the logging rank at the start of each session (a new run, or the
checkpoint's, continued), fed every recorded metric and sample, the summary, and closed with
FINISHED, KILLED (stopped, resumable) or FAILED (esolm_dist.monitor talks to MLflow)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch.distributed as dist
import yaml

from esolm_dist.callbacks.base import Callback
from esolm_dist.config import to_dict
from esolm_dist.parallel.consolidate import logging_rank
from esolm_dist.provenance import run_tags


class MlflowLogging(Callback):
    def __init__(self):
        self.monitor = None

    def on_train_start(self, trainer) -> None:
        """Every rank: the hosts of the job go into the run's tags, the run id comes back to all."""
        cfg, topo, state = trainer.cfg, trainer.topo, trainer.state
        hosts = [None] * topo.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        if topo.is_logging_rank:
            from esolm_dist.checkpoint import layout_of
            from esolm_dist.monitor import MlflowMonitor

            config_file = Path(cfg.train.run_dir) / "config.yaml"
            config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self.monitor = MlflowMonitor(cfg, state.mlflow_run_id, config_file, run_tags(layout_of(topo), hosts))
            if self.monitor.notice:
                print(f"esolm-train: {self.monitor.notice}", flush=True)
            state.mlflow_run_id = self.monitor.run_id
        run_ids = [state.mlflow_run_id]
        dist.broadcast_object_list(run_ids, src=logging_rank(topo))
        state.mlflow_run_id = run_ids[0]
        trainer.say(f"esolm-train: MLflow run {state.mlflow_run_id} at "
                    f"{self.monitor.uri if self.monitor else cfg.logging.mlflow_uri}")

    def on_metrics(self, trainer, named) -> None:
        if self.monitor is not None:
            self.monitor.log(named, trainer.state.step)

    def on_samples(self, trainer, texts) -> None:
        if self.monitor is not None:
            self.monitor.log_samples(texts, trainer.state.step)

    def on_train_end(self, trainer, finished: bool) -> None:
        if self.monitor is not None:
            self.monitor.log_summary(trainer.summary, trainer.state.step)
            self._close("FINISHED" if finished else "KILLED")

    def on_failure(self, trainer) -> None:
        if self.monitor is not None:
            self._close("FAILED")

    def _close(self, status: str) -> None:
        monitor, self.monitor = self.monitor, None
        monitor.close(status)
