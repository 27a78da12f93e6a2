"""Exact likelihood of Eso-LM (B) (paper section 2, "Exact likelihood"; Theorem 3.1).

With causal attention in sorted order, ONE forward pass over [all masks ; x sorted by sigma]
with the sequential mask gives every factor log p(x^sigma(l) | x^sigma(<l)) at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from esolm_dist.eso.masks import SEQUENTIAL, RowMaskSpec
from esolm_dist.eso.orders import gather_order

# logits_fn(tokens [R, S], positions [R, S], masks) -> logits [R, S, V]
LogitsFn = Callable[[torch.Tensor, torch.Tensor, RowMaskSpec], torch.Tensor]


def order_log_likelihood(logits_fn: LogitsFn, x: torch.Tensor, sort_idx: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log p_sigma(x) = sum_l log p(x^sigma(l) | x^sigma(<l)) for each sequence, in one causal pass. [B]"""
    batch, length = x.shape
    x_sorted = gather_order(x, sort_idx)
    tokens = torch.cat([torch.full_like(x, mask_id), x_sorted], dim=-1)
    positions = torch.cat([sort_idx, sort_idx], dim=-1)
    masks = RowMaskSpec("B", length, torch.full((batch,), SEQUENTIAL, device=x.device),
                        torch.zeros(batch, 2, dtype=torch.long, device=x.device))
    logits = logits_fn(tokens, positions, masks)[:, :length].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, x_sorted.unsqueeze(-1)).squeeze(-1).sum(-1)


def likelihood_order(length: int, alpha0: float, generator: torch.Generator) -> torch.Tensor:
    """An order for the IW bound: a random Binomial(L, alpha_0) subset in random order, then the rest ascending."""
    chosen = torch.rand(length, generator=generator) < alpha0
    shuffled = torch.randperm(length, generator=generator)
    first = shuffled[chosen[shuffled]]
    rest = torch.arange(length)[~chosen]
    return torch.cat([first, rest])


def importance_weighted_nll(logits_fn: LogitsFn, x: torch.Tensor, num_orders: int, alpha0: float, mask_id: int,
                            generator: torch.Generator) -> torch.Tensor:
    """L_AO^K = -(log(1/K) + logsumexp_k log p_sigma_k(x)) per sequence [B]: an upper bound on -log p(x)
    that decreases in K (each sequence draws its own K orders)."""
    batch, length = x.shape
    per_order = []
    for _ in range(num_orders):
        orders = torch.stack([likelihood_order(length, alpha0, generator) for _ in range(batch)]).to(x.device)
        per_order.append(order_log_likelihood(logits_fn, x, orders, mask_id))
    stacked = torch.stack(per_order)  # [K, B]
    return -(torch.logsumexp(stacked, dim=0) - math.log(num_orders))
