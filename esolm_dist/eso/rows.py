"""Turn a batch of clean sequences into the hybrid-loss model input (paper section 1, batch_split).

The first ``kappa * b`` sequences get the MDM loss on a diffusion input z_t; the rest get the
AR loss on a sequential input [z0 ; x]. Every row holds 2L tokens so that a pipeline carries
one activation shape: two diffusion sequences share a row (block-diagonal mask). All noise
(t, masks, orders) comes from ``generator``, which never looks at token values, so every
rank of a replica can draw the same noise from the same seed without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esolm_dist.eso import schedule
from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL, RowMaskSpec
from esolm_dist.eso.orders import diffusion_order, gather_order, sequential_order


@dataclass
class EsoRows:
    """Model input and loss targets, all in sorted (processing) order, [R, 2L] each."""

    tokens: torch.Tensor  # input ids (mask id where masked)
    positions: torch.Tensor  # original positions, for rotary embeddings
    targets: torch.Tensor  # the clean token each output position is scored against
    loss_weight: torch.Tensor  # loss = sum(nll * loss_weight); 0 where nothing is predicted
    masks: RowMaskSpec
    num_sequences: int  # clean sequences behind these rows (b)

    def to(self, device) -> EsoRows:
        return EsoRows(self.tokens.to(device), self.positions.to(device), self.targets.to(device),
                       self.loss_weight.to(device), self.masks.to(device), self.num_sequences)


def noise_generator(seed: int, step: int, micro_batch: int, dp_rank: int) -> torch.Generator:
    """The generator of one micro-batch's noise, keyed by (run seed, step, micro-batch, DP rank)."""
    key = hash((int(seed), int(step), int(micro_batch), int(dp_rank))) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(key)


def split_sizes(batch: int, kappa: float) -> tuple[int, int]:
    """(diffusion sequences, sequential sequences) of a micro-batch of ``batch`` sequences."""
    n_diffusion = round(batch * kappa)
    return n_diffusion, batch - n_diffusion


def _diffusion_rows(x, alpha0, eps, loss_type, mask_id, variant, generator, normaliser):
    """MDM half: z_t ~ q_t(.|x), diffusion order, ELBO (or low-variance) weight per sequence."""
    n, length = x.shape
    t = schedule.sample_t(n, eps, generator)
    keep = schedule.alpha(t, alpha0, eps)
    is_masked = torch.rand(x.shape, generator=generator) >= keep[:, None]
    order = diffusion_order(is_masked, generator)
    if loss_type == "elbo":
        weight = -schedule.elbo_weight(t, alpha0, eps)  # positive: alpha'/(1 - alpha) < 0
    else:
        weight = torch.ones(n)
    masked_sorted = gather_order(is_masked, order)
    z_t = torch.where(is_masked, torch.full_like(x, mask_id), x)
    rows = dict(
        tokens=gather_order(z_t, order),
        positions=order,
        targets=gather_order(x, order),
        loss_weight=masked_sorted * (weight[:, None] / normaliser),
    )
    n_clean = (~is_masked).sum(-1)
    paired = {key: value.reshape(n // 2, 2 * length) for key, value in rows.items()}
    return paired, n_clean.view(n // 2, 2)


def _sequential_rows(x, alpha0, mask_id, variant, generator, normaliser):
    """AR half: z0 ~ q0(.|x) keeps each token with probability alpha_0; input [z0 ; x]."""
    n, length = x.shape
    is_masked = torch.rand(x.shape, generator=generator) >= alpha0
    order = sequential_order(is_masked, generator, shuffle_clean=(variant == "B"))
    z0 = torch.where(is_masked, torch.full_like(x, mask_id), x)
    x_sorted = gather_order(x, order)
    masked_sorted = gather_order(is_masked, order)
    rows = dict(
        tokens=torch.cat([gather_order(z0, order), x_sorted], dim=-1),
        positions=torch.cat([order, order], dim=-1),
        targets=torch.cat([x_sorted, x_sorted], dim=-1),
        # Outputs on the x half are discarded: only the z0 half's masks are predicted.
        loss_weight=torch.cat([masked_sorted / normaliser, torch.zeros(n, length)], dim=-1),
    )
    n_clean = (~is_masked).sum(-1, keepdim=True).expand(n, 2)
    return rows, n_clean


def build_rows(x: torch.Tensor, *, alpha0: float, kappa: float, variant: str, loss_type: str, eps: float,
               mask_id: int, generator: torch.Generator) -> EsoRows:
    """Hybrid-loss input of a micro-batch x [b, L] of clean token ids.

    Each half is normalised per token of that half (the paper's batch_split), so
    ``sum(nll * loss_weight)`` over the rows is the per-token NELBO estimate.
    """
    if (x == mask_id).any():
        raise ValueError(f"the batch contains the mask token id {mask_id}; the data must not encode [MASK]")
    batch, length = x.shape
    n_diffusion, n_sequential = split_sizes(batch, kappa)
    parts, n_clean, kinds = [], [], []
    if n_diffusion:
        rows, clean = _diffusion_rows(x[:n_diffusion], alpha0, eps, loss_type, mask_id, variant, generator,
                                      n_diffusion * length)
        parts.append(rows)
        n_clean.append(clean)
        kinds.append(torch.full((n_diffusion // 2,), DIFFUSION_PAIR))
    if n_sequential:
        rows, clean = _sequential_rows(x[n_diffusion:], alpha0, mask_id, variant, generator,
                                       n_sequential * length)
        parts.append(rows)
        n_clean.append(clean)
        kinds.append(torch.full((n_sequential,), SEQUENTIAL))
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    masks = RowMaskSpec(variant, length, torch.cat(kinds), torch.cat(n_clean).long())
    return EsoRows(cat["tokens"], cat["positions"], cat["targets"], cat["loss_weight"].float(), masks, batch)
