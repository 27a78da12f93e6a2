"""Attention-mask specs for Eso-LM (A) and (B) (paper section 2), in SORTED coordinates.

Every model input is a batch of rows of 2L tokens, already gathered into their order:
- a DIFFUSION row packs two independent length-L sequences z_t (block-diagonal);
- a SEQUENTIAL row is [z0 ; x], both halves in the sequential order.
Each query attends to one contiguous range of keys (plus itself, for z0 queries): that one
description (``row_key_ranges``) gives the predicate ``allowed(q, k)`` (True = query q may
attend to key k) shared by the dense reference (boolean tensor for SDPA) and FlexAttention's
``mask_mod``, and FlexAttention's block sparsity without a dense mask (esolm_dist.kernels.flex_masks).

The samplers' masks are the diffusion mask of one sequence (``diffusion_allowed``): decoded tokens
are its clean tokens, a step's masks follow in the decoding order. Eso-LM (B) and every cached
step is that mask with variant "B" (causal in the decoding order; queries after C cached rows
are the indices C, C + 1, ...); Eso-LM (A)'s recomputed steps use variant "A".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIFFUSION_PAIR = 0
SEQUENTIAL = 1


def diffusion_key_end(q, n_clean, variant: str):
    """Diffusion input of one sequence (indices within it, clean tokens first): query q attends
    to the keys [0, end).

    (B): causal in sorted order, A_ij = 0 iff sigma^-1(i) >= sigma^-1(j): end = q + 1.
    (A): clean tokens attend to all clean tokens (bidirectional); masks are causal (prefix-LM):
    every query also sees the n_clean clean keys, end = max(q + 1, n_clean).
    """
    end = q + 1
    if variant == "A":
        return torch.maximum(end, n_clean)
    return end


def diffusion_allowed(q, k, n_clean, variant: str):
    """Whether query q may attend to key k (indices >= 0 in sorted order, clean tokens first) in
    the diffusion mask of one sequence: the predicate of ``diffusion_key_end``. (B) ignores n_clean."""
    return k < diffusion_key_end(q, n_clean, variant)


def sequential_key_end(q, seq_len: int, n_clean, variant: str):
    """Sequential input [z0 ; x] of length 2L: BD3-LM's block-diffusion mask with block size 1.

    z0 query i attends to itself and to x at sorted positions < i; x query L + i is causal over
    x (positions <= i). So every query sees the x keys [L, end), and z0 queries themselves too.
    (A) additionally lets every query see all clean x tokens (x-side clean tokens bidirectional).
    """
    end = torch.where(q < seq_len, q + seq_len, q + 1)  # z0: strictly earlier; x: up to itself
    if variant == "A":
        return torch.maximum(end, seq_len + n_clean)
    return end


def row_key_ranges(q, kind, n_clean_first, n_clean_second, seq_len: int, variant: str):
    """The keys query q of a 2L row attends to: [start, end), and q itself where ``with_self``.

    Every Eso-LM mask has this form in sorted coordinates, one contiguous key range per query;
    the dense mask, FlexAttention's ``mask_mod`` and its block sparsity are all derived from it.
    - diffusion pair: the query's own segment (offset 0 or L), range from ``diffusion_key_end``;
    - sequential: x keys [L, ``sequential_key_end``), plus itself for a z0 query.
    """
    in_second = q >= seq_len
    offset = torch.where(in_second, seq_len, 0)
    n_clean_q = torch.where(in_second, n_clean_second, n_clean_first)
    pair_end = offset + diffusion_key_end(q - offset, n_clean_q, variant)
    sequential = kind == SEQUENTIAL
    start = torch.where(sequential, seq_len, offset)
    end = torch.where(sequential, sequential_key_end(q, seq_len, n_clean_first, variant), pair_end)
    return start, end, sequential & ~in_second


def row_allowed(q, k, kind, n_clean_first, n_clean_second, seq_len: int, variant: str):
    """The mask of one 2L row of either kind (the predicate FlexAttention evaluates)."""
    start, end, with_self = row_key_ranges(q, kind, n_clean_first, n_clean_second, seq_len, variant)
    return ((start <= k) & (k < end)) | (with_self & (k == q))


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

    def key_ranges(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """start, end, with_self [R, 2L] of every row's queries (``row_key_ranges``)."""
        device = device or self.kinds.device
        q = torch.arange(self.row_len, device=device).view(1, -1)
        n_clean = self.n_clean.to(device)
        return row_key_ranges(q, self.kinds.to(device).view(-1, 1), n_clean[:, :1], n_clean[:, 1:],
                              self.seq_len, self.variant)

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
