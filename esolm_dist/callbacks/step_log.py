"""What a user watches: train/... metrics at each log step (history and MLflow) with one console
line, and the end-of-session summary line."""

from __future__ import annotations

from esolm_dist import checkpoint
from esolm_dist.callbacks.base import Callback
from esolm_dist.meter import clock, count


class StepLog(Callback):
    def on_step_end(self, trainer, metrics) -> None:
        if metrics is None or not trainer.due(trainer.cfg.train.log_every):
            return
        cfg, state = trainer.cfg, trainer.state
        trainer.record("train", metrics)
        eta = trainer.meter.eta(state.step)
        mfu = f" mfu {100 * metrics['mfu']:.1f}% hfu {100 * metrics['hfu']:.1f}%" if "mfu" in metrics else ""
        memory = f" | mem {metrics['memory_gb']:.1f} GiB" if "memory_gb" in metrics else ""
        trainer.say(f"step {state.step:>6}/{cfg.train.max_steps} loss {metrics['loss']:.4f} "
                    f"(mdm {metrics['loss_diffusion']:.4f} ar {metrics['loss_sequential']:.4f}) lr {metrics['lr']:.2e} "
                    f"gnorm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s{mfu} "
                    f"{metrics['step_time_s']:.2f} s/step | elapsed {clock(trainer.meter.elapsed())} ETA "
                    f"{clock(eta) if eta is not None else '-'} | tokens {count(metrics['tokens_seen'])}{memory} | "
                    f"attention={trainer.network.last_backend}", from_logging_rank=True)

    def on_train_end(self, trainer, finished: bool) -> None:
        cfg, state, summary = trainer.cfg, trainer.state, trainer.summary
        val = (f"validation NELBO/token final {state.last_val_nelbo:.4f}, best {state.best_val_nelbo:.4f}; "
               if state.last_val_nelbo is not None else "")
        mfu = f", MFU {100 * summary['mfu']:.1f}%, HFU {100 * summary['hfu']:.1f}%" if "mfu" in summary else ""
        trainer.say(f"esolm-train: {'finished' if finished else 'stopped'} at step {state.step}: {val}"
                    f"{summary['steps']} steps, {count(summary['tokens'])} tokens in {clock(summary['seconds'])} "
                    f"({summary['tokens_per_s']:.0f} tok/s{mfu}); checkpoint "
                    f"{checkpoint.checkpoint_root(cfg.train.run_dir) / checkpoint.tag_for(state.saved_at)}; "
                    f"MLflow run {state.mlflow_run_id} ({cfg.logging.mlflow_uri}; `mlflow ui --backend-store-uri "
                    f"{cfg.logging.mlflow_uri}`)")
