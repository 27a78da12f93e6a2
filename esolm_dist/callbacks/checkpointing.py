"""Saving checkpoints every train.save_every steps, at the end and on a stop signal
(esolm_dist.checkpoint writes them atomically and prunes this run's old ones; the trainer resumes
from them before the loop starts). Runs after the evaluation callback, so a checkpoint carries
the validation NELBO of its own step."""

from __future__ import annotations

from esolm_dist import checkpoint
from esolm_dist.callbacks.base import Callback
from esolm_dist.config import to_dict


class Checkpointing(Callback):
    def on_train_end(self, trainer, finished: bool) -> None:
        checkpoint.wait_for_pruning()  # old checkpoints are deleted in the background: finish before exiting

    def on_failure(self, trainer) -> None:
        checkpoint.wait_for_pruning()
    def on_step_boundary(self, trainer) -> None:
        if trainer.due(trainer.cfg.train.save_every) or trainer.stopping:
            self.save(trainer)
        if trainer.stopping:
            trainer.say(f"esolm-train: stop signal received; saved step {trainer.state.saved_at} and exiting")

    def save(self, trainer) -> None:
        state, cfg = trainer.state, trainer.cfg
        meta = {"consumed_samples": state.consumed_samples, "run_uid": state.run_uid,
                "mlflow_run_id": state.mlflow_run_id,
                "val_nelbo": state.last_val_nelbo, "best_val_nelbo": state.best_val_nelbo,
                "config": to_dict(cfg), "tokenizer_vocab": trainer.tokenizer.vocab_size, "mask_id": trainer.mask_id}
        rank_state = {"rng": checkpoint.rng_state(), "data": trainer.train_loader.state_dict(),
                      "ema": trainer.ema.state_dict() if trainer.ema is not None else None}
        path = checkpoint.save(trainer.engine.deepspeed, cfg.train.run_dir, state.step, meta, rank_state,
                               trainer.topo, cfg.train.keep_last)
        state.saved_at = state.step
        trainer.say(f"esolm-train: saved {path}")
