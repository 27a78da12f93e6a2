"""Pipeline parallelism: the Eso-LM network as a DeepSpeed PipelineModule (1F1B schedule).

The stages are the network's own components (embedding, blocks, head) wrapped to pass one
tuple between stages: (hidden [R, 2L, d], positions [R, 2L], kinds [R], n_clean [R, 2]). Every
micro-batch has the same shape (rows of 2L tokens), so the pipeline negotiates it once. The
mask metadata travels with the activations, so every stage builds the same attention masks
without extra communication; the loss is computed on the last stage only.

Each component is built with its own seed (``seeded_init``), so a stage builds exactly the
weights the single-process model has, and DeepSpeed's topology orders ranks like
megatron-core (TP fastest, then DP, then PP), so both libraries agree on every group.
"""

from __future__ import annotations

import functools

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch.utils.checkpoint import checkpoint

from esolm_dist.config import ModelConfig
from esolm_dist.eso.loss import hybrid_loss, loss_parts
from esolm_dist.eso.masks import RowMaskSpec
from esolm_dist.kernels.attention import plan_attention
from esolm_dist.model.rotary import rotary_tables
from esolm_dist.model.transformer import Block, Embedding, Head, NetworkParts, seeded_init


class EmbeddingStage(Embedding):
    def __init__(self, cfg: ModelConfig, parts: NetworkParts, seed: int):
        with seeded_init(seed, 0):
            super().__init__(cfg, parts.vocab_size, parts.mp_config)

    def forward(self, inputs):
        tokens, positions, kinds, n_clean = inputs
        return super().forward(tokens), positions, kinds, n_clean


class StagePlans:
    """Rotary tables and attention plan shared by the blocks of one stage for one micro-batch.

    The blocks pass the same positions/kinds/n_clean tensor objects along, so identity tells a
    new micro-batch from the current one; holding references keeps their memory from being reused.
    """

    def __init__(self):
        self._key: tuple = ()
        self._value: tuple = ()
        self.backend = ""

    def get(self, cfg: ModelConfig, variant: str, hidden, positions, kinds, n_clean):
        key = (positions, kinds, n_clean, torch.is_grad_enabled())
        if len(self._key) != len(key) or any(a is not b for a, b in zip(self._key, key, strict=True)):
            masks = RowMaskSpec(variant, cfg.seq_len, kinds, n_clean)
            plan = plan_attention(masks, hidden.device, hidden.dtype, cfg.attention_backend,
                                  needs_grad=torch.is_grad_enabled())
            cos, sin = rotary_tables(positions, cfg.hidden_size // cfg.num_heads, cfg.rotary_base)
            self._key, self._value, self.backend = key, (cos, sin, plan), plan.backend
        return self._value


class BlockStage(Block):
    def __init__(self, cfg: ModelConfig, parts: NetworkParts, seed: int, index: int, variant: str,
                 plans: StagePlans):
        with seeded_init(seed, index + 1):
            super().__init__(cfg, parts.mp_config)
        self.cfg = cfg
        self.variant = variant
        self.plans = plans

    def forward(self, inputs):
        hidden, positions, kinds, n_clean = inputs
        cos, sin, plan = self.plans.get(self.cfg, self.variant, hidden, positions, kinds, n_clean)
        return super().forward(hidden, cos, sin, plan), positions, kinds, n_clean


class HeadStage(Head):
    def __init__(self, cfg: ModelConfig, parts: NetworkParts, seed: int):
        with seeded_init(seed, cfg.num_layers + 1):
            super().__init__(cfg, parts.vocab_size, parts.never_predict, parts.mp_config)

    def forward(self, inputs):
        return super().forward(inputs[0])


class PipelineLoss:
    """loss_fn of the last stage: the hybrid loss, keeping its two halves for logging."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def __call__(self, logits, labels):
        targets, loss_weight, kinds = labels
        out = hybrid_loss(vocab_parallel_cross_entropy(logits.float(), targets), loss_weight, kinds)
        self.parts.append(loss_parts(out))
        return out["loss"]

    def take(self) -> torch.Tensor | None:
        """Mean of (loss, diffusion, sequential) over the micro-batches since the last call."""
        if not self.parts:
            return None
        mean = torch.stack(self.parts).mean(0)
        self.parts = []
        return mean


def network_name(pipeline_layer: int, rest: str, num_layers: int) -> str:
    """A PipelineModule layer index + parameter name -> the EsoTransformer name of that parameter."""
    if pipeline_layer == 0:
        return f"embedding.{rest}"
    if pipeline_layer <= num_layers:
        return f"blocks.{pipeline_layer - 1}.{rest}"
    return f"head.{rest}"


def build_pipeline(cfg: ModelConfig, tokenizer_vocab: int, mask_id: int, dtype: torch.dtype, seed: int,
                   variant: str, tp: int, pp: int, dp: int, activation_checkpointing: bool) -> PipelineModule:
    parts = NetworkParts(cfg, tokenizer_vocab, mask_id, dtype)
    plans = StagePlans()
    layers = [LayerSpec(EmbeddingStage, cfg, parts, seed)]
    layers += [LayerSpec(BlockStage, cfg, parts, seed, index, variant, plans) for index in range(cfg.num_layers)]
    layers += [LayerSpec(HeadStage, cfg, parts, seed)]
    module = PipelineModule(
        layers=layers,
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp),
        loss_fn=PipelineLoss(),
        partition_method="type:BlockStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        checkpointable_layers=["BlockStage"],
    )
    module.vocab_size = parts.vocab_size
    module.num_layers = cfg.num_layers
    module.plans = plans
    return module


def pipeline_inputs(rows) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(first-stage inputs, last-stage labels) of one micro-batch of rows."""
    masks = rows.masks
    return (rows.tokens, rows.positions, masks.kinds, masks.n_clean), (rows.targets, rows.loss_weight, masks.kinds)
