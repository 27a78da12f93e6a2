"""Validation NELBO at step 0 (the baseline every later evaluation is compared with), every
train.eval_every steps and at the end."""

from __future__ import annotations

import math

from esolm_dist.callbacks.base import Callback


class Evaluation(Callback):
    def on_train_start(self, trainer) -> None:
        if trainer.state.step == 0:
            self.evaluate(trainer)

    def on_step_boundary(self, trainer) -> None:
        if trainer.evaluation_due():
            self.evaluate(trainer)

    @staticmethod
    def evaluate(trainer) -> None:
        val, state = trainer.evaluate(), trainer.state
        state.last_val_nelbo = val["nelbo"]
        state.best_val_nelbo = min(val["nelbo"], state.best_val_nelbo if state.best_val_nelbo is not None else math.inf)
        trainer.record("val", {**val, "ppl_bound": math.exp(min(val["nelbo"], 50.0))})
        trainer.say(f"step {state.step:>6} validation NELBO/token {val['nelbo']:.4f} (mdm "
                    f"{val['loss_diffusion']:.4f} ar {val['loss_sequential']:.4f})", from_logging_rank=True)
