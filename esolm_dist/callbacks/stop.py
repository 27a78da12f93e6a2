"""Stop signals (SIGTERM / SIGUSR1 from SLURM or a user): every rank stops after the same step."""

from __future__ import annotations

from esolm_dist.callbacks.base import Callback
from esolm_dist.signals import StopRequest


class StopOnSignal(Callback):
    """Sets ``trainer.stopping`` once any rank was signalled; the checkpoint callback then saves and
    the loop ends. Installed at start-up, so a signal during start-up stops at the first step."""

    def __init__(self, request: StopRequest):
        self.request = request

    def on_step_end(self, trainer, metrics) -> None:
        trainer.stopping = self.request.agreed()
