"""Training rows of the baselines (eso.model: ar, mdlm, bd3lm) for the same network and engine.

Each builder turns a micro-batch x [b, L] of clean ids into an EsoRows whose ``loss_weight``
follows the convention of esolm_dist.eso.rows: ``sum(nll * loss_weight)`` over the rows is the
per-token NELBO (or NLL) estimate, so esolm_dist.eso.loss.hybrid_loss scores every model.

- AR: a standard shift-by-one causal LM. Row [BOS, x_0, .., x_{L-2}] at positions 0..L-1, the
  output at position i scored against x_i (weight 1 / (b L)). BOS is the tokenizer's EOS, as in
  GPT-2. Rows of L tokens.
- MDLM: z_t ~ q_t(.|x) at alpha0 = 1 (alpha_t = 1 - (1 - eps) t), in the original order, with
  bidirectional attention; the masked positions are scored with the ELBO weight
  -alpha_t' / (1 - alpha_t) = 1 / t (or 1 with low_var). Rows of L tokens.
- BD3-LM (block size L'): row [x_t ; x] (2L tokens, both in the original order), block-causal
  masks (esolm_dist.eso.masks); the masked x_t positions are scored with the ELBO weight of
  their block's t. Each block draws its own t: BD3-LM's NELBO is a sum over blocks of each
  block's diffusion ELBO given the clean earlier blocks, each an expectation over its own t, so
  independent per-block times are an unbiased estimate of it (the BD3-LM paper's estimator,
  which also lowers the variance against one t per sequence). The times of all b x (L / L')
  blocks are drawn antithetically together.
"""

from __future__ import annotations

import torch

from esolm_dist.eso import schedule
from esolm_dist.eso.masks import BIDIRECTIONAL, BLOCK_DIFFUSION, CAUSAL, RowMaskSpec
from esolm_dist.eso.rows import EsoRows, build_rows


def _masks(model: str, length: int, kind: int, rows: int, block_size: int = 1) -> RowMaskSpec:
    return RowMaskSpec("B", length, torch.full((rows,), kind), torch.zeros(rows, 2, dtype=torch.long),
                       model=model, block_size=block_size)


def _diffusion_weight(t: torch.Tensor, eps: float, loss_type: str) -> torch.Tensor:
    """Positive weight of a masked token at time t (alpha0 = 1): the ELBO's 1/t, or 1 (low_var)."""
    if loss_type == "elbo":
        return -schedule.elbo_weight(t, 1.0, eps)
    return torch.ones_like(t)


def ar_rows(x: torch.Tensor, bos_id: int) -> EsoRows:
    """The AR input of x [b, L]: [BOS, x_0..x_{L-2}] -> targets x_0..x_{L-1}."""
    n, length = x.shape
    tokens = torch.cat([torch.full((n, 1), bos_id, dtype=x.dtype), x[:, :-1]], dim=1)
    positions = torch.arange(length).expand(n, length)
    weight = torch.full((n, length), 1.0 / (n * length))
    return EsoRows(tokens, positions, x.clone(), weight, _masks("ar", length, CAUSAL, n), n)


def mdlm_rows(x: torch.Tensor, *, eps: float, loss_type: str, mask_id: int, generator: torch.Generator) -> EsoRows:
    """The MDLM input of x [b, L]: one t per sequence, z_t in the original order."""
    n, length = x.shape
    t = schedule.sample_t(n, eps, generator)
    is_masked = torch.rand(x.shape, generator=generator) >= schedule.alpha(t, 1.0, eps)[:, None]
    tokens = torch.where(is_masked, torch.full_like(x, mask_id), x)
    weight = is_masked * (_diffusion_weight(t, eps, loss_type)[:, None] / (n * length))
    positions = torch.arange(length).expand(n, length)
    return EsoRows(tokens, positions, x.clone(), weight.float(), _masks("mdlm", length, BIDIRECTIONAL, n), n)


def bd3lm_rows(x: torch.Tensor, *, block_size: int, eps: float, loss_type: str, mask_id: int,
               generator: torch.Generator) -> EsoRows:
    """The BD3-LM input of x [b, L]: [x_t ; x], one t per block of block_size tokens."""
    n, length = x.shape
    if length % block_size:
        raise ValueError(f"eso.block_size {block_size} must divide the sequence length {length}")
    t = schedule.sample_t(n * (length // block_size), eps, generator).view(n, -1)
    t_token = t.repeat_interleave(block_size, dim=1)  # [b, L]
    is_masked = torch.rand(x.shape, generator=generator) >= schedule.alpha(t_token, 1.0, eps)
    x_t = torch.where(is_masked, torch.full_like(x, mask_id), x)
    weight = is_masked * (_diffusion_weight(t_token, eps, loss_type) / (n * length))
    positions = torch.arange(length).expand(n, length)
    return EsoRows(torch.cat([x_t, x], dim=1), torch.cat([positions, positions], dim=1), torch.cat([x, x], dim=1),
                   torch.cat([weight.float(), torch.zeros(n, length)], dim=1),
                   _masks("bd3lm", length, BLOCK_DIFFUSION, n, block_size), n)


def training_rows(x: torch.Tensor, *, model: str, alpha0: float, kappa: float, variant: str, loss_type: str,
                  eps: float, mask_id: int, bos_id: int, block_size: int, generator: torch.Generator) -> EsoRows:
    """The training rows of micro-batch x [b, L] for eso.model ``model`` (Eso-LM: build_rows)."""
    if model == "esolm":
        return build_rows(x, alpha0=alpha0, kappa=kappa, variant=variant, loss_type=loss_type, eps=eps,
                          mask_id=mask_id, generator=generator)
    if (x == mask_id).any():
        raise ValueError(f"the batch contains the mask token id {mask_id}; the data must not encode [MASK]")
    if model == "ar":
        return ar_rows(x, bos_id)
    if model == "mdlm":
        return mdlm_rows(x, eps=eps, loss_type=loss_type, mask_id=mask_id, generator=generator)
    if model == "bd3lm":
        return bd3lm_rows(x, block_size=block_size, eps=eps, loss_type=loss_type, mask_id=mask_id,
                          generator=generator)
    raise ValueError(f"unknown model {model!r}; one of esolm, ar, mdlm, bd3lm")
