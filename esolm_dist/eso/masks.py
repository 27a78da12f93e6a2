"""Attention-mask specs for Eso-LM (A) and (B) (paper section 2), in SORTED coordinates.

Every model input is a batch of rows of 2L tokens, already gathered into their order:
- a DIFFUSION row packs two independent length-L sequences z_t (block-diagonal);
- a SEQUENTIAL row is [z0 ; x], both halves in the sequential order.
A mask is one predicate ``allowed(q, k)`` (True = query q may attend to key k) shared by
the dense reference (boolean tensor for SDPA) and FlexAttention's ``mask_mod``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIFFUSION_PAIR = 0
SEQUENTIAL = 1


def diffusion_allowed(q, k, n_clean, variant: str):
    """Diffusion input of one sequence (indices within it, clean tokens first).

    (B): causal in sorted order, A_ij = 0 iff sigma^-1(i) >= sigma^-1(j).
    (A): clean tokens attend to all clean tokens (bidirectional); masks are causal (prefix-LM).
    """
    causal = k <= q
    if variant == "A":
        return causal | (k < n_clean)
    return causal


def sequential_allowed(q, k, seq_len: int, n_clean, variant: str):
    """Sequential input [z0 ; x] of length 2L: BD3-LM's block-diffusion mask with block size 1.

    z0 query i attends to itself and to x at sorted positions < i; x is causal.
    (A) additionally lets every query see all clean x tokens (x-side clean tokens bidirectional).
    """
    q_in_z = q < seq_len
    k_in_x = k >= seq_len
    x_limit = torch.where(q_in_z, q, q - seq_len + 1)  # z0: strictly earlier; x: up to itself
    allowed = (k_in_x & (k - seq_len < x_limit)) | (q_in_z & (k == q))
    if variant == "A":
        allowed = allowed | (k_in_x & (k - seq_len < n_clean))
    return allowed


def row_allowed(q, k, kind, n_clean_first, n_clean_second, seq_len: int, variant: str):
    """The mask of one 2L row of either kind (the predicate FlexAttention evaluates)."""
    q_local, k_local = q % seq_len, k % seq_len
    same_segment = (q < seq_len) == (k < seq_len)
    n_clean_q = torch.where(q < seq_len, n_clean_first, n_clean_second)
    pair = same_segment & diffusion_allowed(q_local, k_local, n_clean_q, variant)
    sequential = sequential_allowed(q, k, seq_len, n_clean_first, variant)
    return torch.where(kind == SEQUENTIAL, sequential, pair)


@dataclass
class RowMaskSpec:
    """The attention masks of a batch of 2L rows: what every attention backend must implement."""

    variant: str
    seq_len: int  # L; rows hold 2L tokens
    kinds: torch.Tensor  # [R] DIFFUSION_PAIR or SEQUENTIAL
    n_clean: torch.Tensor  # [R, 2] clean tokens per segment (diffusion) or [n, n] (sequential)

    @property
    def row_len(self) -> int:
        return 2 * self.seq_len

    def dense(self, device=None) -> torch.Tensor:
        """Boolean [R, 1, 2L, 2L], True = attend (the reference every backend is checked against)."""
        device = device or self.kinds.device
        idx = torch.arange(self.row_len, device=device)
        q, k = idx.view(1, -1, 1), idx.view(1, 1, -1)
        kinds = self.kinds.to(device).view(-1, 1, 1)
        n_clean = self.n_clean.to(device)
        allowed = row_allowed(q, k, kinds, n_clean[:, 0].view(-1, 1, 1), n_clean[:, 1].view(-1, 1, 1),
                              self.seq_len, self.variant)
        return allowed.unsqueeze(1)

    def mask_mod(self):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx) for the same predicate."""
        kinds, n_clean, seq_len, variant = self.kinds, self.n_clean, self.seq_len, self.variant

        def mod(b, h, q_idx, kv_idx):
            return row_allowed(q_idx, kv_idx, kinds[b], n_clean[b, 0], n_clean[b, 1], seq_len, variant)

        return mod

    def segments_if_causal(self) -> bool:
        """True when every row is two plain causal segments of L (Eso-LM (B) diffusion rows only).

        Such rows can run on a variable-length causal kernel (flash-attn) with 2 segments per row.
        """
        return self.variant == "B" and bool((self.kinds == DIFFUSION_PAIR).all())

    def to(self, device) -> RowMaskSpec:
        return RowMaskSpec(self.variant, self.seq_len, self.kinds.to(device), self.n_clean.to(device))
