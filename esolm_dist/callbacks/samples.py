"""Text samples from the network at each evaluation (logging.samples of them), for the MLflow run.

The weights are gathered to the logging rank alone (a collective: every rank takes part, none but
the logging rank holds more than one gathered tensor) and sampled there with the same KV-cached
Eso-LM sampler users run on exports (esolm_dist.preview)."""

from __future__ import annotations

from esolm_dist.callbacks.base import Callback


class TextSamples(Callback):
    def __init__(self, count: int):
        self.count = count

    def on_train_start(self, trainer) -> None:
        if trainer.state.step == 0:
            self.draw(trainer)

    def on_step_boundary(self, trainer) -> None:
        if trainer.evaluation_due():
            self.draw(trainer)

    def draw(self, trainer) -> None:
        from esolm_dist.parallel.consolidate import full_state_dict_on, logging_rank
        from esolm_dist.preview import preview_samples

        weights = full_state_dict_on(trainer.engine.module, trainer.topo, logging_rank(trainer.topo))
        if weights is None:  # not the logging rank
            return
        cfg = trainer.cfg
        texts = preview_samples(weights, cfg, trainer.tokenizer, trainer.mask_id, self.count, cfg.train.seed,
                                trainer.topo.device)
        trainer.notify("on_samples", texts)
