"""One training engine interface over DeepSpeed's plain and pipeline engines.

The trainer runs a train step and an eval step on micro-batches of rows and never asks which
engine it has. Both steps return this rank's mean (loss, diffusion half, sequential half) over
the micro-batches, on every rank of the model (the pipeline's last stage, which computes the
loss, broadcasts it to the other stages); averaging over data-parallel replicas is the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from esolm_dist.eso.loss import loss_parts
from esolm_dist.model.objective import row_tensors
from esolm_dist.parallel.pipeline import pipeline_inputs


class TrainingEngine:
    """What both engines share: the DeepSpeed engine (checkpoints), the module, norm and LR."""

    def __init__(self, deepspeed_engine, grad_norm):
        self.deepspeed = deepspeed_engine
        self._grad_norm = grad_norm

    @property
    def module(self) -> torch.nn.Module:
        return self.deepspeed.module

    def grad_norm(self) -> float:
        """Global gradient norm of the last step (all TP shards, all stages)."""
        return self._grad_norm()

    def lr(self) -> float:
        return self.deepspeed.get_lr()[0]

    def destroy(self) -> None:
        self.deepspeed.destroy()

    def train_step(self, rows: Iterable, micro_batches: int) -> torch.Tensor:
        raise NotImplementedError

    def eval_step(self, rows: Iterable, micro_batches: int) -> torch.Tensor:
        raise NotImplementedError


class PlainEngine(TrainingEngine):
    """DeepSpeed's engine over the objective: forward, backward and step per micro-batch (the step
    applies the optimizer at the accumulation boundary)."""

    def train_step(self, rows: Iterable, micro_batches: int) -> torch.Tensor:
        sums = None
        for micro_rows in rows:
            out = self.deepspeed(*row_tensors(micro_rows))
            self.deepspeed.backward(out["loss"])
            self.deepspeed.step()
            sums = loss_parts(out) if sums is None else sums + loss_parts(out)
        return sums / micro_batches

    @torch.no_grad()
    def eval_step(self, rows: Iterable, micro_batches: int) -> torch.Tensor:
        self.deepspeed.eval()
        try:
            sums = sum(loss_parts(self.deepspeed(*row_tensors(r))) for r in rows)
        finally:
            self.deepspeed.train()
        return sums / micro_batches


class PipelineEngine(TrainingEngine):
    """DeepSpeed's PipelineEngine (1F1B): only the first and last stages draw micro-batches from
    ``rows`` (and so advance their readers)."""

    def train_step(self, rows: Iterable, micro_batches: int) -> torch.Tensor:
        self.deepspeed.train_batch(data_iter=(pipeline_inputs(r) for r in rows))
        return self._loss_parts()

    @torch.no_grad()
    def eval_step(self, rows: Iterable, micro_batches: int) -> torch.Tensor:
        self.deepspeed.eval()
        try:
            self.deepspeed.eval_batch(data_iter=(pipeline_inputs(r) for r in rows),
                                      num_micro_batches=micro_batches)
        finally:
            self.deepspeed.train()
        return self._loss_parts()

    def _loss_parts(self) -> torch.Tensor:
        """The micro-batches' mean loss parts, from the last stage (which computed them) to every stage."""
        from megatron.core import parallel_state as ps

        parts = self.module.loss_fn.take()
        device = next(self.module.parameters()).device
        parts = parts if parts is not None else torch.zeros(3, device=device)
        dist.broadcast(parts, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return parts
