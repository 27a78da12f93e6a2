"""Pipeline parallelism cut from outside: the one Eso-LM objective as a DeepSpeed PipelineModule (1F1B).

``pipeline_module`` turns the embedding, the blocks and the head of the objective's own network
into stages; nothing is built twice. Each stage is a *view* of its component: it shares the
component's parameters, buffers and submodules, so the weights, their names in checkpoints and
the initialisation are exactly the single-process model's. The stages pass one tuple along:
(hidden [R, 2L, d], positions [R, 2L], kinds [R], n_clean [R, 2]). Every micro-batch has the same
shape (rows of 2L tokens), so the pipeline negotiates it once. The mask metadata travels with the
activations; every block asks the network for the rotary tables and attention plan
(``EsoTransformer.context``, computed once per micro-batch and stage) and the last stage computes
the objective's own loss.

DeepSpeed's topology orders ranks like megatron-core (TP fastest, then DP, then PP), so both
libraries agree on every group.
"""

from __future__ import annotations

import functools

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn
from torch.utils.checkpoint import checkpoint

from esolm_dist.eso.loss import loss_parts
from esolm_dist.model.objective import EsoObjective


class ComponentView(nn.Module):
    """A pipeline stage that *is* one component of the network: the same parameter, buffer and
    submodule dicts (so ``.to()``, state dicts and the optimizer see the component under its own
    names); the component itself is kept unregistered so nothing is counted twice."""

    def __init__(self, component: nn.Module):
        super().__init__()
        self._parameters = component._parameters
        self._buffers = component._buffers
        self._non_persistent_buffers_set = component._non_persistent_buffers_set
        self._modules = component._modules
        object.__setattr__(self, "component", component)


class EmbeddingStage(ComponentView):
    def forward(self, inputs):
        tokens, positions, kinds, n_clean = inputs
        return self.component(tokens), positions, kinds, n_clean


class StageContext:
    """The rotary tables and attention plan of the current micro-batch, shared by one stage's blocks.

    The blocks pass the same positions/kinds/n_clean tensor objects along, so identity tells a new
    micro-batch from the current one; holding references keeps their memory from being reused.
    """

    def __init__(self, objective: EsoObjective):
        self.objective = objective
        self._key: tuple = ()
        self._value: tuple = ()

    def get(self, hidden, positions, kinds, n_clean):
        key = (positions, kinds, n_clean, torch.is_grad_enabled())
        if len(self._key) != len(key) or any(a is not b for a, b in zip(self._key, key, strict=True)):
            masks = self.objective.masks(kinds, n_clean)
            self._key, self._value = key, self.objective.network.context(positions, masks, hidden)
        return self._value


class BlockStage(ComponentView):
    def __init__(self, block: nn.Module, context: StageContext):
        super().__init__(block)
        object.__setattr__(self, "context", context)

    def forward(self, inputs):
        hidden, positions, kinds, n_clean = inputs
        cos, sin, plan = self.context.get(hidden, positions, kinds, n_clean)
        return self.component(hidden, cos, sin, plan), positions, kinds, n_clean


class HeadStage(ComponentView):
    def forward(self, inputs):
        return self.component(inputs[0])


class PipelineLoss:
    """loss_fn of the last stage: the objective's loss, keeping its two halves for logging."""

    def __init__(self, objective: EsoObjective):
        self.objective = objective
        self.parts: list[torch.Tensor] = []

    def __call__(self, logits, labels):
        out = self.objective.loss(logits, *labels)
        self.parts.append(loss_parts(out))
        return out["loss"]

    def take(self) -> torch.Tensor | None:
        """Mean of (loss, diffusion, sequential) over the micro-batches since the last call."""
        if not self.parts:
            return None
        mean = torch.stack(self.parts).mean(0)
        self.parts = []
        return mean


def pipeline_module(objective: EsoObjective, tp: int, pp: int, dp: int,
                    activation_checkpointing: bool) -> PipelineModule:
    """The objective cut into ``pp`` stages of whole blocks (the first also holds the embedding, the
    last the head). The components of other stages are moved to the meta device: each rank keeps
    only its own stage's weights."""
    network = objective.network
    context = StageContext(objective)
    layers = [EmbeddingStage(network.embedding), *(BlockStage(block, context) for block in network.blocks),
              HeadStage(network.head)]
    module = PipelineModule(
        layers=layers,
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
        loss_fn=PipelineLoss(objective),
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        checkpointable_layers=["BlockStage"],
    )
    for index, layer in enumerate(layers):
        if not module._local_start <= index < module._local_stop:
            layer.to("meta")
    module.num_layers = len(network.blocks)  # esolm_dist.weight_layout maps layer indices to network names
    return module


def pipeline_inputs(rows) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(first-stage inputs, last-stage labels) of one micro-batch of rows."""
    masks = rows.masks
    return (rows.tokens, rows.positions, masks.kinds, masks.n_clean), (rows.targets, rows.loss_weight, masks.kinds)
