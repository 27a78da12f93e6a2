"""The hybrid Eso-LM loss (v4 eq. 7) from per-position negative log-likelihoods."""

from __future__ import annotations

import torch

from esolm_dist.eso.masks import DIFFUSION_KINDS, SEQUENTIAL_KINDS


def hybrid_loss(nll: torch.Tensor, loss_weight: torch.Tensor, kinds: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token NELBO = MDM part (diffusion rows) + AR part (sequential rows).

    The baselines' rows count as one half each: MDLM and BD3-LM as diffusion, AR as sequential.

    ``nll`` [R, 2L] is -log p(target) at every position; positions with weight 0 are ignored
    (``where``, not a product, so an infinite nll where nothing is predicted cannot leak in).
    """
    weighted = torch.where(loss_weight > 0, nll * loss_weight, torch.zeros_like(nll))
    per_row = weighted.sum(-1)
    diffusion = per_row[_is_any(kinds, DIFFUSION_KINDS)].sum()
    sequential = per_row[_is_any(kinds, SEQUENTIAL_KINDS)].sum()
    return {"loss": diffusion + sequential, "loss_diffusion": diffusion, "loss_sequential": sequential}


def _is_any(kinds: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
    selected = torch.zeros_like(kinds, dtype=torch.bool)
    for value in values:
        selected |= kinds == value
    return selected


def loss_parts(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """(loss, diffusion half, sequential half) of a hybrid_loss result, detached: what is logged."""
    return torch.stack([out["loss"], out["loss_diffusion"], out["loss_sequential"]]).detach()
