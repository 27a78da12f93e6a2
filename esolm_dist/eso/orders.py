"""Generation orders as sort indices (paper section 2).

An order is a permutation ``sort_idx`` [B, L]: ``sort_idx[b, i]`` is the ORIGINAL position
processed i-th. Tokens are gathered into that order before the network and keep their
original positions through rotary embeddings.
"""

from __future__ import annotations

import torch


def _keys_then_sort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """argsort by (primary, secondary) with secondary in [0, 1): primary dominates."""
    return torch.argsort(primary.to(torch.float64) + secondary.to(torch.float64), dim=-1, stable=True)


def diffusion_order(is_masked: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Eso-LM diffusion order: clean tokens first in random order, then masks in random order."""
    noise = torch.rand(is_masked.shape, generator=generator, dtype=torch.float64) * 0.5
    return _keys_then_sort(is_masked.to(torch.float64), noise)


def sequential_order(is_masked: torch.Tensor, generator: torch.Generator, shuffle_clean: bool = True) -> torch.Tensor:
    """Eso-LM sequential order: clean tokens first (shuffled), then masks left to right.

    Eso-LM (A) does not shuffle its clean tokens (they attend to each other bidirectionally).
    """
    length = is_masked.shape[-1]
    positions = torch.arange(length, dtype=torch.float64).expand(is_masked.shape) / (2.0 * length)
    noise = torch.rand(is_masked.shape, generator=generator, dtype=torch.float64) * 0.5
    clean_key = noise if shuffle_clean else positions
    secondary = torch.where(is_masked, positions, clean_key)
    return _keys_then_sort(is_masked.to(torch.float64), secondary)


def natural_order(batch: int, length: int) -> torch.Tensor:
    """The left-to-right order: pure AR (alpha_0 = 0)."""
    return torch.arange(length).expand(batch, length).clone()


def inverse_permutation(sort_idx: torch.Tensor) -> torch.Tensor:
    """rank[b, l] = where original position l sits in the order (sigma^-1)."""
    inverse = torch.empty_like(sort_idx)
    ranks = torch.arange(sort_idx.shape[-1], device=sort_idx.device).expand_as(sort_idx)
    return inverse.scatter_(-1, sort_idx, ranks)


def gather_order(values: torch.Tensor, sort_idx: torch.Tensor) -> torch.Tensor:
    """values [B, L] in original order -> values in the order of sort_idx."""
    return torch.gather(values, -1, sort_idx)
