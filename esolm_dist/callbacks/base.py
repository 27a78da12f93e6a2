"""The callback interface of the training loop (esolm_dist.train.Trainer), in the habit of OLMo-core.

The loop runs optimizer steps; everything else hangs off it as a callback: checkpoints,
evaluation, text samples, MLflow, throughput and MFU, the console, stop signals. Each hook gets
the trainer and may read its state (``trainer.state``, ``trainer.cfg``, ``trainer.topo``) and call
its services (``trainer.evaluate()``, ``trainer.record()``, ``trainer.due()``). Every rank runs
every hook, in the order of the trainer's callback list, so collectives inside hooks line up.
"""

from __future__ import annotations


class Callback:
    def on_train_start(self, trainer) -> None:
        """Before the first step of this session (after a resume has set the step)."""

    def on_step_end(self, trainer, metrics: dict[str, float] | None) -> None:
        """After each optimizer step, on the training clock: keep it cheap. ``metrics`` holds the
        step's DP-averaged losses, grad norm and LR at log and save steps (None otherwise: reading
        them is a host sync), and callbacks may add to it before later ones log it."""

    def on_step_boundary(self, trainer) -> None:
        """After ``on_step_end``, off the training clock: evaluations, samples, saves."""

    def on_metrics(self, trainer, named: dict[str, float]) -> None:
        """Metrics named ``group/key`` were recorded at ``trainer.state.step``."""

    def on_samples(self, trainer, texts: list[str]) -> None:
        """Text samples were drawn from the network at ``trainer.state.step``."""

    def on_train_end(self, trainer, finished: bool) -> None:
        """The session ends: ``finished`` at max_steps, else stopped by a signal."""

    def on_failure(self, trainer) -> None:
        """The session ends with an exception (re-raised after the hooks)."""
