"""The reader the trainer calls: `build_loader` -> a `ShardLoader` of [B, L] int64 micro-batches
for one data-parallel rank, cut from one global order of the split's sequences (see plan), with
a small, layout-free state: the position in that order.

Micro-batches travel from the loader's workers in messages of k consecutive micro-batches;
message c (counted from where this pass starts) is made by worker c % W. The DataLoader asks
its workers in turn and delivers results in the order asked, so the caller receives the
messages in order c = 0, 1, 2, ... whatever W is, and counting micro-batches as they are taken
keeps `state_dict()` exact however far the DataLoader has prefetched.
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from esolm_dist.data.errors import DataError
from esolm_dist.data.manifest import Manifest, read_manifest
from esolm_dist.data.plan import GlobalOrder, RankSlice
from esolm_dist.data.shard_reader import REBUILD, ShardRows

logger = logging.getLogger(__name__)
STATE_FORMAT = "esolm-shard-loader/2"  # /2: a position in the global order
MESSAGE_TOKENS = 2**18  # tokens per worker-to-caller message (several micro-batches when small)


class _OrderStream(IterableDataset):
    """Worker side: yields (tokens [k, B, L] in the shards' dtype, corrupt shards found so far)
    for this worker's messages, from micro-batch `first` on (see the module docstring).

    Under skip_corrupt, a sequence of a corrupt shard is replaced by the same row of the next
    readable shard (in manifest order, wrapping): batches keep their size and the replacement
    is the same in every worker and layout. Each corrupt shard is warned about once per worker.
    """

    def __init__(self, shard_dir: Path, manifest: Manifest, split: str, order: GlobalOrder,
                 ranks: RankSlice, per_message: int, skip_corrupt: bool):
        self.shard_dir = shard_dir
        self.manifest = manifest
        self.shards = manifest.splits[split].shards
        self.order = order
        self.ranks = ranks
        self.per_message = per_message
        self.skip_corrupt = skip_corrupt
        self.first = 0  # micro-batch index this pass starts at; set by ShardLoader
        self._rows: ShardRows | None = None  # per process: verified shards and open maps
        self._corrupt: set[int] = set()

    def __iter__(self):
        """This worker's messages; a DataError is passed on as an item (see ShardLoader)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self._rows is None:
            self._rows = ShardRows(self.shard_dir, self.manifest, self.shards)
        try:
            yield from self._messages(worker, workers)
        except DataError as exc:
            yield exc

    def _messages(self, worker: int, workers: int):
        permutations: dict[int, np.ndarray] = {}
        total = self.ranks.micro_batches
        per_shard = self.shards[0].sequences
        message = worker
        while True:
            first = self.first + message * self.per_message
            count = self.per_message if total is None else min(self.per_message, total - first)
            if count <= 0:
                return
            positions = self.ranks.positions(first, count).ravel()
            shards, rows = np.divmod(self.order.sequence_indices(positions, permutations),
                                     per_shard)
            tokens = self._rows.read(self._readable(shards), rows)
            yield (torch.from_numpy(tokens.reshape(count, self.ranks.micro_batch_size, -1)),
                   sorted(self._corrupt))
            message += workers

    def _readable(self, shards: np.ndarray) -> np.ndarray:
        """`shards` with each corrupt shard replaced by the next readable one."""
        out = shards.copy()
        for shard in np.unique(shards).tolist():
            candidate = shard
            while not self._usable(candidate):
                candidate = (candidate + 1) % len(self.shards)
                if candidate == shard:
                    raise DataError(f"{self.shard_dir}: every shard of the split is corrupt; "
                                    f"rebuild the shards with tools/make_shards.py")
            out[shards == shard] = candidate
        return out

    def _usable(self, shard: int) -> bool:
        """Whether `shard` verifies; a corrupt one is a DataError unless skip_corrupt."""
        if shard in self._corrupt:
            return False
        try:
            self._rows.check(shard)
        except DataError as exc:
            if not self.skip_corrupt:
                raise
            self._corrupt.add(shard)
            logger.warning("skipped corrupt shard (%d so far in this worker): %s",
                           len(self._corrupt), exc)
            return False
        return True


class ShardLoader:
    """Iterable of [micro_batch_size, seq_len] int64 micro-batches for one DP rank.

    Infinite loaders cycle through freshly shuffled epochs and every `iter()` continues where
    the caller stopped; finite loaders make one pass over the split in stored order, the same
    on every `iter()` (unless a state was just loaded), in full micro-batches only, the same
    number on every DP rank. `skipped_shards` counts the corrupt shards skipped under
    skip_corrupt.
    """

    def __init__(self, shard_dir: Path, split: str, stream: _OrderStream, num_workers: int):
        self.shard_dir = shard_dir
        self.split = split
        self._stream = stream
        self._num_workers = num_workers
        self._initial = stream.ranks
        self._taken = 0  # micro-batches taken since stream.ranks.start
        self._resume_pending = False
        self._corrupt: set[int] = set()

    @property
    def ranks(self) -> RankSlice:
        return self._stream.ranks

    @property
    def skipped_shards(self) -> int:
        return len(self._corrupt)

    def __len__(self) -> int:
        """Micro-batches of one pass of a finite loader."""
        if self._initial.micro_batches is None:
            raise TypeError("an infinite loader has no length")
        return self._initial.micro_batches

    def __iter__(self):
        if self._initial.micro_batches is not None and not self._resume_pending:
            self._stream.ranks, self._taken = self._initial, 0
        self._resume_pending = False
        self._stream.first = self._taken
        messages = (DataLoader(self._stream, batch_size=None, num_workers=self._num_workers)
                    if self._num_workers else self._stream)
        for message in messages:
            if isinstance(message, DataError):
                raise message  # re-raised here: the DataLoader would bury it in a traceback
            batches, corrupt = message
            self._corrupt.update(corrupt)
            for batch in batches:
                self._taken += 1
                yield batch.long()

    def _order_settings(self) -> dict:
        """What a saved state must agree with: anything that changes the global order."""
        order = self._stream.order
        return {"split": self.split, "shuffle": order.shuffle, "seed": order.seed,
                "sequences": order.sequences, "seq_len": self._stream.manifest.seq_len}

    def _layout(self) -> dict:
        ranks = self.ranks
        return {"global_batch_size": ranks.global_batch_size, "dp_size": ranks.dp_size,
                "micro_batch_size": ranks.micro_batch_size}

    def state_dict(self) -> dict:
        """The position after the micro-batches already taken: the samples of the global batches
        fully taken, plus (mid-step) the micro-batches taken of the next one. JSON-serialisable
        and equal on all DP ranks; at a step boundary it fits any layout."""
        ranks = self.ranks
        return {"format": STATE_FORMAT, **self._order_settings(),
                "consumed_samples": ranks.consumed_samples(self._taken),
                "step_micro_batches": self._taken % ranks.per_step, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the global order where `state` was taken (call before iterating); a state
        from another DP size, micro-batch size, worker count or global batch size continues
        at its consumed samples."""
        differing = [f"{key}={state.get(key)!r} (now {value!r})"
                     for key, value in self._order_settings().items() if state.get(key) != value]
        if state.get("format") != STATE_FORMAT or differing:
            raise DataError(f"{self.shard_dir}: saved data state does not fit this loader "
                            f"({', '.join(differing) or 'unknown format'}); resume with the "
                            f"same data settings or drop the saved data state")
        within = state["step_micro_batches"]
        saved_layout = {key: state[key] for key in self._layout()}
        if within and saved_layout != self._layout():
            raise DataError(f"{self.shard_dir}: the saved data state was taken {within} "
                            f"micro-batches into a global batch under {saved_layout}, which "
                            f"cannot continue under {self._layout()}; resume with that layout")
        start = state["consumed_samples"]
        self._stream.ranks = dataclasses.replace(
            self._initial, start=start, micro_batches=_micro_batches(
                self._stream.order, self._initial, start))
        self._taken = within
        self._resume_pending = True


def _micro_batches(order: GlobalOrder, ranks: RankSlice, start: int) -> int | None:
    """Micro-batches per rank in the rest of a single (unshuffled) pass; None when endless."""
    if order.shuffle:
        return None
    return max(0, order.sequences - start) // ranks.global_batch_size * ranks.per_step


def _check_split(path: Path, split: str, manifest: Manifest, infinite: bool,
                 global_batch_size: int) -> int:
    """Sequences in the split; DataError unless its shards are equal and (for a single pass)
    it holds at least one global batch."""
    if split not in manifest.splits:
        raise DataError(f"{path}: no {split!r} split; rebuild with tools/make_shards.py"
                        f"{' --val-fraction 0.01' if split == 'val' else ''}")
    shards = manifest.splits[split].shards
    if len({shard.sequences for shard in shards}) != 1:
        raise DataError(f"{path}: {split} shards differ in size; rebuild with "
                        f"tools/make_shards.py")
    sequences = manifest.splits[split].sequences
    if not infinite and sequences < global_batch_size:
        raise DataError(f"{path}: the {split} split holds {sequences} sequences, fewer than one "
                        f"batch of dp_size x micro_batch_size = {global_batch_size}; add data "
                        f"(raise data.val_fraction) or use a smaller micro-batch")
    return sequences


def _check_shard_files(shard_dir: Path, split: str, manifest: Manifest,
                       skip_corrupt: bool) -> None:
    """Every shard of the split must exist with its recorded size: DataError naming the first
    that does not (with skip_corrupt, one warning; the reader then skips those shards)."""
    shards = manifest.splits[split].shards
    problems = [problem for shard in shards if (problem := shard.file_problem(shard_dir))]
    if not problems:
        return
    count = f"{len(problems)} of {len(shards)} {split} shards missing or of the wrong size"
    if not skip_corrupt:
        raise DataError(f"{problems[0]} ({count}); {REBUILD}")
    logger.warning("%s, skipped when reached (skip_corrupt); the first: %s", count, problems[0])


def _describe(split: str, manifest: Manifest, order: GlobalOrder, ranks: RankSlice,
              workers: int) -> str:
    """One line for the log: what is read, in what order, and what this rank takes."""
    shards = manifest.splits[split].shards
    how = (f"shuffled every epoch (seed {order.seed})" if order.shuffle
           else f"one pass in stored order, {ranks.micro_batches} micro-batches per rank, "
                f"{order.sequences % ranks.global_batch_size} sequences dropped")
    return (f"{split}: {order.sequences} sequences in {len(shards)} shards, {how}; global batch "
            f"{ranks.global_batch_size} = DP {ranks.dp_size} x {ranks.per_step} micro-batches x "
            f"{ranks.micro_batch_size}; DP rank {ranks.dp_rank} reads its slice with "
            f"{workers} worker(s)")


def build_loader(shard_dir: str | Path, split: str = "train", *, seq_len: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 global_batch_size: int | None = None, num_workers: int = 1, seed: int = 0,
                 tokenizer_fingerprint: str, skip_corrupt: bool = False, infinite: bool = True,
                 micro_batches_per_message: int | None = None) -> ShardLoader:
    """A loader of `split` for data-parallel rank dp_rank of dp_size.

    Global batch s is the same sequences whatever dp_size, micro_batch_size and num_workers
    are; this rank gets its contiguous slice of it (see plan). global_batch_size defaults to
    dp_size x micro_batch_size (one micro-batch per rank per step, as evaluation wants).

    Pass the DATA-PARALLEL rank, never the global rank: all TP ranks and PP stages of one
    replica pass the same dp_rank and get identical batches. The manifest must match the
    run's seq_len and tokenizer, and every shard of the split must exist with its recorded
    size (each shard's sha256 is checked when it is first read). micro_batches_per_message
    (default: about MESSAGE_TOKENS tokens) groups micro-batches into worker messages; it does
    not change what is delivered.
    """
    global_batch_size = global_batch_size or dp_size * micro_batch_size
    if (not 0 <= dp_rank < dp_size or micro_batch_size < 1 or num_workers < 0
            or global_batch_size % (dp_size * micro_batch_size)):
        raise ValueError(f"need 0 <= dp_rank < dp_size, micro_batch_size >= 1, num_workers >= 0 "
                         f"and global_batch_size a multiple of dp_size x micro_batch_size; got "
                         f"dp_rank={dp_rank}, dp_size={dp_size}, micro_batch_size="
                         f"{micro_batch_size}, num_workers={num_workers}, "
                         f"global_batch_size={global_batch_size}")
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    manifest_path = shard_dir / "manifest.json"
    manifest.check_matches(manifest_path, seq_len, tokenizer_fingerprint)
    sequences = _check_split(manifest_path, split, manifest, infinite, global_batch_size)
    _check_shard_files(shard_dir, split, manifest, skip_corrupt)
    order = GlobalOrder(sequences=sequences, seed=seed, shuffle=infinite)
    ranks = RankSlice(global_batch_size=global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      micro_batch_size=micro_batch_size, start=0, micro_batches=None)
    ranks = dataclasses.replace(ranks, micro_batches=_micro_batches(order, ranks, 0))
    logger.info(_describe(split, manifest, order, ranks, num_workers))
    per_message = micro_batches_per_message or max(1, MESSAGE_TOKENS // (micro_batch_size * seq_len))
    stream = _OrderStream(shard_dir, manifest, split, order, ranks, per_message, skip_corrupt)
    return ShardLoader(shard_dir, split, stream, num_workers)
