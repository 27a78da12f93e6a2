"""The reader the trainer calls: `build_loader` -> a `ShardLoader` of [B, L] int64 batches for
one data-parallel rank, with a small state that resumes the stream exactly.

Workers read whole shards with webdataset's tar iterator (see shard_reader) and follow the
ReadPlan (see plan). Each batch travels with its worker's position after it, and the loader
records positions as the caller takes batches, so `state_dict()` is exact however far the
DataLoader has prefetched. The state is the same on every DP rank (positions are relative
to each rank's share), so a checkpoint needs one copy.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from esolm_dist.data.errors import DataError
from esolm_dist.data.manifest import Manifest, read_manifest
from esolm_dist.data.plan import Piece, ReadPlan
from esolm_dist.data.shard_reader import REBUILD, read_shard

logger = logging.getLogger(__name__)
STATE_FORMAT = "esolm-shard-loader/1"
MESSAGE_TOKENS = 2**18  # tokens per worker-to-caller message (several batches when small)


class _ShardStream(IterableDataset):
    """Worker side: yields messages (tokens [k, b, L], worker, positions, skipped) holding k
    consecutive batches of one worker, in the shards' own dtype (the caller widens them).
    positions[j] is the worker's (epoch, offset) after batch j; skipped counts the corrupt
    shards the worker has found so far (each is warned about once, then passed over).

    Batching several batches per message amortises the DataLoader's per-message cost. A
    message never crosses a block boundary (offsets that are multiples of block_span), so
    the grouping depends only on positions and a resumed worker regroups identically.
    """

    def __init__(self, shard_dir: Path, manifest: Manifest, split: str, plan: ReadPlan,
                 infinite: bool, skip_corrupt: bool):
        self.shard_dir = shard_dir
        self.manifest = manifest
        self.shards = manifest.splits[split].shards
        self.plan = plan
        self.infinite = infinite
        self.skip_corrupt = skip_corrupt
        batch_tokens = plan.micro_batch_size * manifest.seq_len
        self.block_span = max(1, MESSAGE_TOKENS // batch_tokens) * plan.micro_batch_size
        self.start_positions = [(0, 0)] * plan.num_workers  # (epoch, offset) per worker
        self.first_worker = 0  # the worker whose batch the caller takes first
        self.corrupt: set[int] = set()  # manifest indices of shards found corrupt

    def __iter__(self):
        """Messages for this worker; a DataError is passed on as an item (see ShardLoader)."""
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.first_worker) % self.plan.num_workers
        try:
            yield from self._worker_messages(worker)
        except DataError as exc:
            yield exc

    def _worker_messages(self, worker: int):
        epoch, offset = self.start_positions[worker]
        self.corrupt = set()
        while True:
            for batches, positions in self._messages(worker, epoch, offset):
                yield torch.from_numpy(batches), worker, positions, len(self.corrupt)
            if not self.infinite:
                return
            epoch, offset = epoch + 1, 0

    def _messages(self, worker: int, epoch: int, offset: int):
        """(batches [k, b, L], positions after each) grouped by block and batch size."""
        group, positions, group_block = [], [], None
        for rows, start, end in self._epoch_batches(worker, epoch, offset):
            block = start // self.block_span
            if group and (block != group_block or len(rows) != len(group[0])):
                yield np.stack(group), positions
                group, positions = [], []
            group.append(rows)
            positions.append((epoch, end))
            group_block = block
        if group:
            yield np.stack(group), positions

    def _epoch_batches(self, worker: int, epoch: int, offset: int):
        """(rows [b, L], offset of the first row, offset after the last) for one worker's
        share of one epoch, starting `offset` sequences in."""
        size = self.plan.micro_batch_size
        pending, count, first = [], 0, None
        for piece in self.plan.pieces(epoch, worker, offset):
            tokens, rows = self._piece_rows(epoch, piece)
            used = 0
            while used < len(rows):
                if count == 0:
                    first = piece.end - len(rows) + used
                take = rows[used:used + size - count]
                pending.append(tokens[take])
                used += len(take)
                count += len(take)
                if count == size:
                    yield _joined(pending), first, piece.end - len(rows) + used
                    pending, count = [], 0
        if pending and self.plan.keep_partial_batch:
            start, stop = self.plan.worker_range(worker)
            yield _joined(pending), first, stop - start

    def _piece_rows(self, epoch: int, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """The piece's shard tokens and its row indices in epoch order (no rows when the
        shard is skipped as corrupt)."""
        no_rows = np.empty((0, self.manifest.seq_len)), np.empty(0, dtype=np.int64)
        if piece.shard in self.corrupt:
            return no_rows
        shard = self.shards[piece.shard]
        try:
            tokens = read_shard(self.shard_dir / shard.name, shard, self.manifest)
        except DataError as exc:
            if not self.skip_corrupt:
                raise
            self.corrupt.add(piece.shard)
            logger.warning("skipped corrupt shard (%d so far in this worker): %s",
                           len(self.corrupt), exc)
            if len(self.corrupt) == len(self.shards):
                raise DataError(f"{self.shard_dir}: every shard of the split is corrupt; "
                                f"rebuild the shards with tools/make_shards.py") from None
            return no_rows
        return tokens, self.plan.sequence_order(epoch, piece.shard)[piece.lo:piece.hi]


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class ShardLoader:
    """Iterable of [micro_batch_size, seq_len] int64 batches for one DP rank.

    Infinite loaders cycle epochs and every `iter()` continues where the caller stopped;
    finite loaders make one pass of epoch 0, the same on every `iter()` (unless a state was
    just loaded). `plan` tells the per-epoch counts; `skipped_shards` counts corrupt shards
    skipped under skip_corrupt.
    """

    def __init__(self, shard_dir: Path, split: str, stream: _ShardStream, num_workers: int):
        self.shard_dir = shard_dir
        self.split = split
        self.plan = stream.plan
        self.skipped_shards = 0
        self._stream = stream
        self._num_workers = num_workers
        self._positions = [(0, 0)] * self.plan.num_workers
        self._next_worker = 0
        self._resume_pending = False

    def __iter__(self):
        if not self._stream.infinite and not self._resume_pending:
            self._positions = [(0, 0)] * self.plan.num_workers
            self._next_worker = 0
        self._resume_pending = False
        self._stream.start_positions = list(self._positions)
        self._stream.first_worker = self._next_worker
        seen_skips = [0] * self.plan.num_workers
        messages = DataLoader(self._stream, batch_size=None, num_workers=self._num_workers)
        for message in messages:
            if isinstance(message, DataError):
                raise message  # re-raised here: the DataLoader would bury it in a traceback
            batches, worker, positions, skipped = message
            self.skipped_shards += skipped - seen_skips[worker]
            seen_skips[worker] = skipped
            for index, (batch, (epoch, offset)) in enumerate(zip(batches, positions, strict=True)):
                self._positions[worker] = (epoch, offset)
                last_of_message = index == len(positions) - 1
                self._next_worker = (worker + last_of_message) % self.plan.num_workers
                yield batch.long()

    def _settings(self) -> dict:
        """What a saved state must agree with to be resumed exactly."""
        plan = self.plan
        return {"split": self.split, "infinite": self._stream.infinite, "seed": plan.seed,
                "dp_size": plan.dp_size, "num_workers": plan.num_workers,
                "micro_batch_size": plan.micro_batch_size,
                "seq_len": self._stream.manifest.seq_len, "num_shards": plan.num_shards,
                "sequences_per_shard": plan.sequences_per_shard}

    def state_dict(self) -> dict:
        """The position after the batches already taken; JSON-serialisable, equal on all
        DP ranks."""
        return {"format": STATE_FORMAT, **self._settings(), "next_worker": self._next_worker,
                "workers": [{"epoch": epoch, "offset": offset}
                            for epoch, offset in self._positions]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (call before iterating)."""
        differing = [f"{key}={state.get(key)!r} (now {value!r})"
                     for key, value in self._settings().items() if state.get(key) != value]
        if state.get("format") != STATE_FORMAT or differing:
            raise DataError(f"{self.shard_dir}: saved data state does not fit this loader "
                            f"({', '.join(differing) or 'unknown format'}); resume with the "
                            f"same data settings or drop the saved data state")
        self._positions = [(w["epoch"], w["offset"]) for w in state["workers"]]
        self._next_worker = state["next_worker"]
        self._resume_pending = True


def _check_shards(path: Path, split: str, manifest: Manifest, dp_size: int, workers: int,
                  micro_batch_size: int) -> int:
    """Sequences per shard; DataError unless the split can feed dp_size x workers readers."""
    if split not in manifest.splits:
        raise DataError(f"{path}: no {split!r} split; rebuild with tools/make_shards.py"
                        f"{' --val-fraction 0.01' if split == 'val' else ''}")
    shards = manifest.splits[split].shards
    if len({shard.sequences for shard in shards}) != 1:
        raise DataError(f"{path}: {split} shards differ in size; rebuild with "
                        f"tools/make_shards.py")
    if len(shards) < dp_size * workers:
        raise DataError(f"{path}: the {split} split has {len(shards)} shards, fewer than "
                        f"dp_size x num_workers = {dp_size} x {workers}: {dp_size * workers} "
                        f"are needed; rebuild with tools/make_shards.py --min-shards "
                        f"{dp_size * workers} or use fewer workers")
    per_rank = len(shards) * shards[0].sequences // dp_size
    if per_rank < workers * micro_batch_size:
        raise DataError(f"{path}: the {split} split gives each DP rank {per_rank} sequences, "
                        f"fewer than num_workers x micro_batch_size = {workers * micro_batch_size}"
                        f"; add data or use a smaller micro-batch or fewer workers")
    return shards[0].sequences


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


def build_loader(shard_dir: str | Path, split: str = "train", *, seq_len: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 num_workers: int = 1, seed: int = 0, tokenizer_fingerprint: str,
                 skip_corrupt: bool = False, infinite: bool = True) -> ShardLoader:
    """A loader of `split` for data-parallel rank dp_rank of dp_size.

    Pass the DATA-PARALLEL rank, never the global rank: all TP ranks and PP stages of one
    replica pass the same dp_rank and get identical batches. The manifest must match the
    run's seq_len and tokenizer, and every shard of the split must exist with its recorded
    size (each shard's sha256 is checked as it is read). With skip_corrupt a corrupt shard
    is skipped with a counted warning (in finite mode, ranks can then end with different
    numbers of batches).
    """
    if not 0 <= dp_rank < dp_size or micro_batch_size < 1 or num_workers < 0:
        raise ValueError(f"need 0 <= dp_rank < dp_size, micro_batch_size >= 1, num_workers >= 0;"
                         f" got dp_rank={dp_rank}, dp_size={dp_size}, "
                         f"micro_batch_size={micro_batch_size}, num_workers={num_workers}")
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    manifest_path = shard_dir / "manifest.json"
    manifest.check_matches(manifest_path, seq_len, tokenizer_fingerprint)
    workers = max(1, num_workers)
    sequences_per_shard = _check_shards(manifest_path, split, manifest, dp_size, workers,
                                        micro_batch_size)
    _check_shard_files(shard_dir, split, manifest, skip_corrupt)
    plan = ReadPlan(num_shards=len(manifest.splits[split].shards),
                    sequences_per_shard=sequences_per_shard, dp_rank=dp_rank, dp_size=dp_size,
                    num_workers=workers, micro_batch_size=micro_batch_size, seed=seed,
                    keep_partial_batch=not infinite)
    logger.info(plan.describe(split))
    stream = _ShardStream(shard_dir, manifest, split, plan, infinite, skip_corrupt)
    return ShardLoader(shard_dir, split, stream, num_workers)
