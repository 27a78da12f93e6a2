"""Building token shards: corpus -> equal-sized webdataset tars + manifest.json.

`make_shards` always builds; `ensure_shards` builds only when the directory does not already
hold shards of the same corpus, tokenizer, seq_len and options. Crash safety: a shard is
written under a temporary name and renamed when complete; the old manifest is deleted before
the first shard is touched and the new one is written last, so a reader (which only trusts
the manifest) never accepts an interrupted build.
"""

import fcntl
import math
import os
import re
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from esolm_dist.data.corpus import corpus_fingerprint, find_corpus_files
from esolm_dist.data.errors import DataError
from esolm_dist.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    SplitInfo,
    member_sizes,
    read_manifest,
    stored_dtype,
    token_dtype,
)
from esolm_dist.data.packing import PackedSplit, pack_corpus
from esolm_dist.data.tokenizer import load_tokenizer

SPLITS = ("train", "val")
BUILD_FILE = re.compile(r"^(train|val)-\d{6}\.tar(\.tmp)?$|^manifest\.json\.tmp$")
DEFAULT_TOKENS_PER_MEMBER = 2**16
DEFAULT_SHARD_TOKENS = 2**24
DEFAULT_MIN_SHARDS = 8


def shard_count(sequences: int, seq_len: int, shard_tokens: int, min_shards: int) -> int:
    """Shards for a split: about shard_tokens tokens each, at least min_shards, at most one
    per sequence."""
    return min(sequences, max(min_shards, math.ceil(sequences * seq_len / shard_tokens)))


def _remove_previous_build(out_dir: Path) -> None:
    """Invalidate the old manifest first, then delete old shards and temporary files."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if BUILD_FILE.match(path.name):
            path.unlink()


def _write_shard(path: Path, sequences: np.ndarray, rows: np.ndarray, sequences_per_member: int,
                 dtype: str) -> None:
    """Write sequences[rows] as one tar of raw-token members; atomic via a temp name."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=0) as writer:
            start = 0
            for index, size in enumerate(member_sizes(len(rows), sequences_per_member)):
                tokens = sequences[rows[start:start + size]].astype(stored_dtype(dtype))
                writer.write({"__key__": f"{index:06d}", dtype: tokens.tobytes()})
                start += size
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_token_shards(out_dir: str | Path, splits: dict[str, PackedSplit], *,
                       tokenizer_fingerprint: str, vocab_size: int, seed: int = 0,
                       tokens_per_member: int = DEFAULT_TOKENS_PER_MEMBER,
                       shard_tokens: int = DEFAULT_SHARD_TOKENS,
                       min_shards: int = DEFAULT_MIN_SHARDS, build: dict | None = None,
                       progress: bool = False) -> Manifest:
    """Write packed splits ({"train": ..., "val": ...}) as shards plus manifest.json.

    Sequences are shuffled once with `seed` (so every shard samples the whole corpus) and
    dealt into equal shards; the few left over (< number of shards) are dropped and counted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_build(out_dir)
    seq_len = next(iter(splits.values())).sequences.shape[1]
    dtype = token_dtype(vocab_size)
    sequences_per_member = max(1, tokens_per_member // seq_len)
    infos = {}
    for split, packed in splits.items():
        total = len(packed.sequences)
        count = shard_count(total, seq_len, shard_tokens, min_shards)
        per_shard = total // count
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(total)
        names = [f"{split}-{index:06d}.tar" for index in range(count)]
        for index, name in enumerate(tqdm(names, desc=f"write {split}", disable=not progress)):
            rows = order[index * per_shard:(index + 1) * per_shard]
            _write_shard(out_dir / name, packed.sequences, rows, sequences_per_member, dtype)
        leftover = total - count * per_shard
        infos[split] = SplitInfo(shards=[ShardInfo(name, per_shard) for name in names],
                                 documents=packed.documents, packed_sequences=total,
                                 dropped_tokens=packed.tail_tokens + leftover * seq_len)
    manifest = Manifest(tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size,
                        seq_len=seq_len, dtype=dtype, sequences_per_member=sequences_per_member,
                        splits=infos, build=build or {})
    manifest.write(out_dir)
    return manifest


def _build_record(files: list[Path], val_fraction: float, seed: int, tokens_per_member: int,
                  shard_tokens: int, min_shards: int) -> dict:
    """What determines a build's output besides tokenizer and seq_len (not the paths: a moved
    corpus is the same corpus)."""
    return {"input_sha256": corpus_fingerprint(files), "input_files": len(files),
            "val_fraction": val_fraction, "seed": seed, "tokens_per_member": tokens_per_member,
            "shard_tokens": shard_tokens, "min_shards": min_shards}


def _check_options(seq_len: int, val_fraction: float, tokens_per_member: int,
                   shard_tokens: int, min_shards: int) -> None:
    if seq_len < 1 or tokens_per_member < 1 or shard_tokens < 1 or min_shards < 1:
        raise ValueError("seq_len, tokens_per_member, shard_tokens and min_shards must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def make_shards(inputs: Iterable[str | Path], tokenizer_path: str | Path, seq_len: int,
                out_dir: str | Path, val_fraction: float = 0.01, workers: int | None = None,
                seed: int = 0, tokens_per_member: int = DEFAULT_TOKENS_PER_MEMBER,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, min_shards: int = DEFAULT_MIN_SHARDS,
                progress: bool = True) -> Manifest:
    """Tokenize a corpus (files/directories of .txt/.jsonl, optionally .gz) into train/val
    shards in out_dir. The output depends on the inputs and options, not on `workers`."""
    _check_options(seq_len, val_fraction, tokens_per_member, shard_tokens, min_shards)
    out_dir = Path(out_dir)
    files = find_corpus_files(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    build = _build_record(files, val_fraction, seed, tokens_per_member, shard_tokens, min_shards)
    work_dir = out_dir / ".build"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        splits = pack_corpus(files, tokenizer.path, seq_len, val_fraction, work_dir,
                             workers or os.cpu_count(), progress)
        return write_token_shards(out_dir, splits, tokenizer_fingerprint=tokenizer.fingerprint,
                                  vocab_size=tokenizer.vocab_size, seed=seed,
                                  tokens_per_member=tokens_per_member, shard_tokens=shard_tokens,
                                  min_shards=min_shards, build=build, progress=progress)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@contextmanager
def _exclusive(out_dir: Path):
    """Hold an exclusive lock on out_dir/.lock: concurrent ensure_shards calls build once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_shards(corpus_paths: Iterable[str | Path], tokenizer_path: str | Path, seq_len: int,
                  out_dir: str | Path, val_fraction: float = 0.01, *, seed: int = 0,
                  tokens_per_member: int = DEFAULT_TOKENS_PER_MEMBER,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, min_shards: int = DEFAULT_MIN_SHARDS,
                  workers: int | None = None, progress: bool = False) -> Manifest:
    """Return out_dir's manifest, building the shards first unless they were built from the
    same corpus content, tokenizer, seq_len and options (see make_shards)."""
    out_dir = Path(out_dir)
    corpus_paths = list(corpus_paths)
    with _exclusive(out_dir):
        wanted = _build_record(find_corpus_files(corpus_paths), val_fraction, seed,
                               tokens_per_member, shard_tokens, min_shards)
        fingerprint = load_tokenizer(tokenizer_path).fingerprint
        try:
            manifest = read_manifest(out_dir)
            if (manifest.seq_len, manifest.tokenizer_fingerprint, manifest.build) == (
                    seq_len, fingerprint, wanted):
                return manifest
        except DataError:
            pass  # missing or unreadable: build it
        return make_shards(corpus_paths, tokenizer_path, seq_len, out_dir, val_fraction,
                           workers, seed, tokens_per_member, shard_tokens, min_shards, progress)
