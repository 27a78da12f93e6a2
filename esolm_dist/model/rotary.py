"""Rotary position embeddings indexed by ORIGINAL position (tokens are processed in sorted order)."""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, base: float, device: torch.device | None = None) -> torch.Tensor:
    """base^(-2i / head_dim) for i < head_dim / 2, in fp32."""
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [R, 1, S, head_dim/2] for positions [R, S], computed in fp32."""
    return angle_tables(positions, inverse_frequencies(head_dim, base, positions.device))


def angle_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [R, 1, S, F] of the angles position x inv_freq [F], in fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [R, H, S, D] over the full head dim, non-interleaved halves, in fp32 (cast back)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)
