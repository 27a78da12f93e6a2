"""tokens/s, MFU and HFU of each log window and of the session (esolm_dist.flops counts the FLOPs;
the trainer's StepMeter keeps training time apart from evaluation and checkpoint time)."""

from __future__ import annotations

import torch

from esolm_dist.callbacks.base import Callback


class Throughput(Callback):
    def __init__(self, flops_per_step: float, hardware_flops_per_step: float, peak_flops: float | None,
                 peak_source: str, tokens_per_step: int):
        self.flops_per_step = flops_per_step  # model FLOPs of one optimizer step, all ranks
        self.hardware_flops_per_step = hardware_flops_per_step  # what the kernels execute
        self.peak_flops = peak_flops  # per process; None where the device's peak is unknown
        self.peak_source = peak_source
        self.tokens_per_step = tokens_per_step

    def rates(self, steps: int, seconds: float, world_size: int) -> dict[str, float]:
        """tokens/s, and MFU and HFU where the device's peak is known, of ``steps`` trained in ``seconds``."""
        rates = {"tokens_per_s": steps * self.tokens_per_step / seconds}
        if self.peak_flops:
            per_flop_s = steps / seconds / (self.peak_flops * world_size)
            rates["mfu"], rates["hfu"] = self.flops_per_step * per_flop_s, self.hardware_flops_per_step * per_flop_s
        return rates

    def on_train_start(self, trainer) -> None:
        trainer.say(f"esolm-train: MFU peak: {self.peak_source}")

    def on_step_end(self, trainer, metrics) -> None:
        if metrics is None or not trainer.due(trainer.cfg.train.log_every):
            return
        steps, seconds = trainer.meter.take_window()
        metrics.update(self.rates(steps, seconds, trainer.topo.world_size))
        metrics["step_time_s"] = seconds / steps
        metrics["tokens_seen"] = trainer.state.consumed_samples * trainer.cfg.model.seq_len
        device = trainer.topo.device
        if device.type == "cuda":
            metrics["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_end(self, trainer, finished: bool) -> None:
        meter = trainer.meter
        meter.take_window()
        trainer.summary.update({
            "steps": meter.total_steps, "seconds": meter.elapsed(), "tokens": meter.total_steps * self.tokens_per_step,
            **(self.rates(meter.total_steps, meter.total_seconds, trainer.topo.world_size) if meter.total_seconds
               else {"tokens_per_s": 0.0})})
