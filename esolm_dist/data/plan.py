"""Who reads which sequence when: one global order of a split's sequences, cut into global
batches, each cut by data-parallel rank into micro-batches. Pure arithmetic on seeds; no I/O.

The split's N sequences are numbered in manifest order (shard 0's rows, then shard 1's, ...).
The global order is an endless stream of positions p = 0, 1, 2, ...: position p is sequence
perm_e[p % N] with e = p // N and perm_e = default_rng([seed, e]).permutation(N) (a fresh
shuffle every epoch), or simply p for an unshuffled single pass. Global batch s is positions
[start + s*G, start + (s+1)*G), `start` being the samples consumed before this loader began
(Megatron's consumed samples), so batches run across epoch ends and nothing is dropped.

DP rank r takes the contiguous slice [r*G/DP, (r+1)*G/DP) of each global batch, as G/(DP*B)
micro-batches of B sequences in order. The sequences of global batch s therefore do not depend
on DP, TP, PP, B or the number of loader workers; every rank of one replica (TP ranks, PP
stages) that passes the same dp_rank reads the same sequences.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GlobalOrder:
    """Sequence index at each position of the global order (see the module docstring)."""

    sequences: int
    seed: int
    shuffle: bool

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of the sequence indices (int32 where it fits, to halve memory)."""
        dtype = np.int32 if self.sequences < 2**31 else np.int64
        order = np.arange(self.sequences, dtype=dtype)
        np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def sequence_indices(self, positions: np.ndarray, cache: dict[int, np.ndarray]) -> np.ndarray:
        """The sequence index at each position; `cache` keeps epoch permutations between calls
        (the caller owns it, so each worker process keeps its own)."""
        if not self.shuffle:
            return positions % self.sequences
        epochs, offsets = np.divmod(positions, self.sequences)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            if epoch not in cache:
                for old in [e for e in cache if e < epoch - 1]:
                    del cache[old]  # positions only move forward: older epochs are done
                cache[epoch] = self.permutation(epoch)
            here = epochs == epoch
            out[here] = cache[epoch][offsets[here]]
        return out


@dataclass(frozen=True)
class RankSlice:
    """The micro-batches of one DP rank: micro-batch i (counted from the loader's start) holds
    the global-order positions `positions(i)`. `micro_batches` is None for an endless stream."""

    global_batch_size: int
    dp_rank: int
    dp_size: int
    micro_batch_size: int
    start: int  # samples consumed before micro-batch 0
    micro_batches: int | None

    @property
    def per_step(self) -> int:
        """Micro-batches this rank takes from one global batch."""
        return self.global_batch_size // (self.dp_size * self.micro_batch_size)

    def positions(self, first: int, count: int) -> np.ndarray:
        """[count, micro_batch_size] positions of micro-batches first .. first+count-1."""
        index = np.arange(first, first + count, dtype=np.int64)
        step, within = np.divmod(index, self.per_step)
        base = (self.start + step * self.global_batch_size
                + self.dp_rank * (self.global_batch_size // self.dp_size)
                + within * self.micro_batch_size)
        return base[:, None] + np.arange(self.micro_batch_size, dtype=np.int64)

    def consumed_samples(self, taken: int) -> int:
        """Global position after the last global batch fully taken by `taken` micro-batches."""
        return self.start + taken // self.per_step * self.global_batch_size
