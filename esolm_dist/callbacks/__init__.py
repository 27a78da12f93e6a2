"""The training loop's callbacks (interface: base.Callback); ``default_callbacks`` is the trainer's list.

Their order is the order every hook runs in, on every rank:

- stop first, so the later ones know at this step whether the run is stopping;
- throughput before the step log, which prints and records the rates it adds;
- MLflow after both (it logs the summary they complete at the end) and before evaluation (whose
  step-0 record it must already take);
- evaluation before samples and checkpoints, so a checkpoint carries its own step's validation
  NELBO.
"""

from __future__ import annotations

from esolm_dist.callbacks.base import Callback
from esolm_dist.callbacks.checkpointing import Checkpointing
from esolm_dist.callbacks.evaluation import Evaluation
from esolm_dist.callbacks.mlflow_logging import MlflowLogging
from esolm_dist.callbacks.samples import TextSamples
from esolm_dist.callbacks.step_log import StepLog
from esolm_dist.callbacks.stop import StopOnSignal
from esolm_dist.callbacks.throughput import Throughput

__all__ = ["Callback", "Checkpointing", "Evaluation", "MlflowLogging", "StepLog", "StopOnSignal", "TextSamples",
           "Throughput", "default_callbacks"]


def throughput_for(trainer) -> Throughput:
    """The throughput meter of the trainer's model, batch and devices (esolm_dist.flops)."""
    from esolm_dist.flops import device_peak_flops, matmul_precision, training_step_flops

    cfg, topo = trainer.cfg, trainer.topo
    flops = training_step_flops(cfg, trainer.network.vocab_size, trainer.mask_id, topo.device, topo.dp_rank,
                                trainer.accumulation)
    peak, source = device_peak_flops(topo.device, matmul_precision(cfg.parallel))
    return Throughput(flops.model * topo.dp_size, flops.hardware * topo.dp_size, peak, source,
                      cfg.train.global_batch_size * cfg.model.seq_len)


def default_callbacks(trainer) -> list[Callback]:
    samples = [TextSamples(trainer.cfg.logging.samples)] if trainer.cfg.logging.samples else []
    return [StopOnSignal(trainer.stop_request), throughput_for(trainer), StepLog(), MlflowLogging(), Evaluation(),
            *samples, Checkpointing()]
