"""Who reads which sequence when: the per-epoch order of a split, cut by data-parallel rank,
then by DataLoader worker. Pure arithmetic on seeds; no I/O.

Epoch e's stream: the shards in a seeded order, each shard's sequences in a seeded order.
DP rank r reads stream positions [r*n, (r+1)*n) with n = total // dp_size, so every rank gets
the same count and the last total % dp_size sequences of the epoch are dropped. The rank's n
sequences form batches (a final partial batch is kept when `keep_partial_batch`, dropped
otherwise); worker w reads a contiguous run of those batches. Every rank of one replica (TP
ranks, PP stages) that passes the same dp_rank reads the same sequences.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Sequences [lo, hi) of one shard in its epoch order; `end` is the worker offset after it."""

    shard: int
    lo: int
    hi: int
    end: int


@dataclass(frozen=True)
class ReadPlan:
    """The read order of one split for one DP rank (see the module docstring)."""

    num_shards: int
    sequences_per_shard: int
    dp_rank: int
    dp_size: int
    num_workers: int
    micro_batch_size: int
    seed: int
    keep_partial_batch: bool

    @property
    def sequences_per_rank(self) -> int:
        return self.num_shards * self.sequences_per_shard // self.dp_size

    @property
    def batches_per_rank(self) -> int:
        """Batches each DP rank gets per epoch (the same on every rank)."""
        full, rest = divmod(self.sequences_per_rank, self.micro_batch_size)
        return full + (1 if rest and self.keep_partial_batch else 0)

    @property
    def dropped_to_equalise_ranks(self) -> int:
        """Sequences per epoch (all ranks together) dropped so every DP rank gets the same count."""
        return self.num_shards * self.sequences_per_shard - self.dp_size * self.sequences_per_rank

    @property
    def dropped_partial_batches(self) -> int:
        """Sequences per epoch (all ranks together) dropped because they make no full batch."""
        used = min(self.sequences_per_rank, self.batches_per_rank * self.micro_batch_size)
        return self.dp_size * (self.sequences_per_rank - used)

    def worker_range(self, worker: int) -> tuple[int, int]:
        """[start, stop) of this rank's per-epoch sequences that `worker` reads."""
        first = worker * self.batches_per_rank // self.num_workers
        last = (worker + 1) * self.batches_per_rank // self.num_workers
        return (first * self.micro_batch_size,
                min(last * self.micro_batch_size, self.sequences_per_rank))

    def shard_order(self, epoch: int) -> np.ndarray:
        """Manifest indices of the shards in epoch order (the same on every rank)."""
        return np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_shards)

    def sequence_order(self, epoch: int, shard: int) -> np.ndarray:
        """Row indices of one shard's sequences in epoch order."""
        rng = np.random.default_rng([self.seed, epoch, 1, shard])
        return rng.permutation(self.sequences_per_shard)

    def pieces(self, epoch: int, worker: int, offset: int) -> Iterator[Piece]:
        """The shard pieces `worker` reads in `epoch`, from `offset` sequences into its range."""
        start, stop = self.worker_range(worker)
        shards = self.shard_order(epoch)
        rank_base = self.dp_rank * self.sequences_per_rank
        position = start + offset
        while position < stop:
            slot, lo = divmod(rank_base + position, self.sequences_per_shard)
            hi = min(self.sequences_per_shard, lo + stop - position)
            position += hi - lo
            yield Piece(int(shards[slot]), lo, hi, position - start)

    def describe(self, split: str) -> str:
        """One line for the log: the per-epoch counts and what is dropped, and why."""
        return (f"{split}: {self.num_shards} shards x {self.sequences_per_shard} sequences; "
                f"DP rank {self.dp_rank}/{self.dp_size} reads {self.sequences_per_rank} "
                f"sequences = {self.batches_per_rank} batches of {self.micro_batch_size} per "
                f"epoch over {self.num_workers} worker(s); dropped per epoch: "
                f"{self.dropped_to_equalise_ranks} to equalise DP ranks, "
                f"{self.dropped_partial_batches} in partial batches")
