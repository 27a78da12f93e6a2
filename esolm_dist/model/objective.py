"""The training objective: the network plus the hybrid loss, as one module for the engine.

Its parts are used by both training paths: ``forward`` for the plain engine, and ``masks`` and
``loss`` by the pipeline stages that esolm_dist.parallel.pipeline cuts from the same objective.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn

from esolm_dist.eso.loss import hybrid_loss
from esolm_dist.eso.masks import RowMaskSpec
from esolm_dist.eso.rows import EsoRows


class EsoObjective(nn.Module):
    """forward(rows as tensors) -> {"loss", "loss_diffusion", "loss_sequential"} (per-token NELBO)."""

    def __init__(self, network: nn.Module, variant: str, seq_len: int, model: str = "esolm", block_size: int = 1):
        super().__init__()
        self.network = network
        self.variant = variant
        self.seq_len = seq_len
        self.model = model  # eso.model: which rows and masks (esolm_dist.eso.masks)
        self.block_size = block_size

    def masks(self, kinds: torch.Tensor, n_clean: torch.Tensor) -> RowMaskSpec:
        """The attention masks of a batch of rows, from their kinds and clean-token counts."""
        return RowMaskSpec(self.variant, self.seq_len, kinds, n_clean, self.model, self.block_size)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor, loss_weight: torch.Tensor,
             kinds: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hybrid loss of vocab-parallel logits (fp32 cross entropy over the TP group)."""
        return hybrid_loss(vocab_parallel_cross_entropy(logits.float(), targets), loss_weight, kinds)

    def forward(self, tokens, positions, targets, loss_weight, kinds, n_clean) -> dict[str, torch.Tensor]:
        logits = self.network(tokens, positions, self.masks(kinds, n_clean))
        return self.loss(logits, targets, loss_weight, kinds)


def row_tensors(rows: EsoRows) -> tuple[torch.Tensor, ...]:
    """The positional arguments of EsoObjective.forward for a batch of rows."""
    return rows.tokens, rows.positions, rows.targets, rows.loss_weight, rows.masks.kinds, rows.masks.n_clean
