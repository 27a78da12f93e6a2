"""Building token shards: corpus -> equal-sized webdataset tars + manifest.json.

`make_shards` (tools/make_shards.py) builds into an empty folder, or over a previous shard
build with overwrite. `ensure_shards`, the trainer's automatic build of data.corpus, writes
only into a missing or empty folder or over its own previous automatic build, which it reuses
when it was made from the same corpus content, tokenizer, seq_len and options; it never
writes into any other folder (see ensure_shards).

A build's files: those its manifest lists and, while its journal build-in-progress.json
exists, every shard-named file and the work folder the journal names. A build deletes or
replaces only the files of a previous build, never a file that no build wrote.

Crash safety: the journal is written before anything else and the corpus is tokenized in the
work folder it names (a failure while tokenizing leaves the folder as it was); then the old
manifest is deleted before the old build's other files, shards are written under temporary
names and renamed when complete, the new manifest comes last and the journal is deleted. A
reader trusts only the manifest, so it never accepts an interrupted build, and the next build
recognises the leftovers by the journal and removes them.
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from esolm_dist.atomic_io import write_atomically
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
from esolm_dist.data.tokenizer import EsoTokenizer, load_tokenizer

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")
JOURNAL_NAME = "build-in-progress.json"
JOURNAL_FORMAT = "esolm-shard-build/1"
LOCK_NAME = ".lock"
AUTOMATIC = "ensure_shards"  # the origin recorded by the automatic build
BY_HAND = "make_shards"
BUILD_FILE = re.compile(r"^((train|val)-\d{6}\.tar|manifest\.json|build-in-progress\.json)(\.tmp)?$")
WORK_DIR = re.compile(r"^\.build-[0-9a-f]{8}$")
ANY_MANIFEST_FORMAT = re.compile(r"^esolm-token-shards/\d+$")  # this one and older ones
DEFAULT_TOKENS_PER_MEMBER = 2**16
DEFAULT_SHARD_TOKENS = 2**24
DEFAULT_MIN_SHARDS = 8


def shard_count(sequences: int, seq_len: int, shard_tokens: int, min_shards: int) -> int:
    """Shards for a split: about shard_tokens tokens each, at least min_shards, at most one
    per sequence."""
    return min(sequences, max(min_shards, math.ceil(sequences * seq_len / shard_tokens)))


@dataclass(frozen=True)
class _Folder:
    """What an output folder holds, as a new build sees it."""

    path: Path
    entries: frozenset[str]  # the names in it, the lock file excepted
    owned: frozenset[str]  # those a previous shard build wrote (see the module docstring)
    origin: str | None  # who made that build: AUTOMATIC, BY_HAND, or None (none, or unknown)

    @property
    def others(self) -> list[str]:
        """Names no shard build wrote: never deleted or overwritten."""
        return sorted(self.entries - self.owned)

    @property
    def automatic(self) -> bool:
        """Whether the automatic build may write here: empty, or its own previous build."""
        return not self.entries or self.origin == AUTOMATIC

    def check_no_stray_shard_files(self) -> None:
        """A file named like a build's own that no build lists would be overwritten: refuse."""
        stray = next((name for name in self.others if BUILD_FILE.match(name)), None)
        if stray is not None:
            raise DataError(f"{self.path / stray}: not listed by a shard build in {self.path}, "
                            f"and a new build would overwrite it; move it away or build into "
                            f"another folder")


def _json_record(path: Path) -> dict | None:
    """The JSON object in a file, or None when it is missing or not a JSON object."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _manifest_build(record: dict | None) -> tuple[set[str], str | None]:
    """manifest.json plus the shards it lists (only names a build writes), and the build's
    origin, for a manifest of any esolm format; (set(), None) for anything else."""
    if record is None or not ANY_MANIFEST_FORMAT.match(str(record.get("format"))):
        return set(), None
    try:
        listed = [shard["name"] for split in record["splits"].values() for shard in split["shards"]]
        shards = {name for name in map(str, listed) if BUILD_FILE.match(name)}
        origin = record.get("build", {}).get("origin")
    except (KeyError, TypeError, AttributeError):
        return set(), None
    return {MANIFEST_NAME, *shards}, origin


def _survey(out_dir: Path) -> _Folder:
    """Which files in out_dir a previous shard build wrote, and who made that build."""
    if not out_dir.exists():
        return _Folder(out_dir, frozenset(), frozenset(), None)
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: not a folder; choose a folder for the shards")
    entries = frozenset(path.name for path in out_dir.iterdir()) - {LOCK_NAME}
    owned, origin = _manifest_build(_json_record(out_dir / MANIFEST_NAME))
    journal = _json_record(out_dir / JOURNAL_NAME)
    if (journal is not None and journal.get("format") == JOURNAL_FORMAT
            and WORK_DIR.match(str(journal.get("work_dir")))):
        owned |= {name for name in entries if BUILD_FILE.match(name)} | {journal["work_dir"]}
        origin = journal.get("origin")
    return _Folder(out_dir, entries, frozenset(owned & entries), origin)


def _listing(names: Iterable[str], most: int = 3) -> str:
    """The first few names, sorted, for a message."""
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _check_hand_build_may_write(folder: _Folder, overwrite: bool) -> None:
    """make_shards writes into an empty folder, over leftovers of an interrupted build, or
    (overwrite) next to other files and over the previous shard build."""
    folder.check_no_stray_shard_files()
    if overwrite or (MANIFEST_NAME not in folder.entries and not folder.others):
        return
    held = ("a shard build (manifest.json)" if MANIFEST_NAME in folder.entries
            else f"other files ({_listing(folder.others)})")
    raise DataError(f"{folder.path} already holds {held}; pass --overwrite to replace the "
                    f"shard build there (other files are kept), or choose an empty --out")


def _remove_work_dirs(folder: _Folder) -> None:
    """Delete the work folder of an interrupted build (intermediate token streams only)."""
    for name in folder.owned:
        if WORK_DIR.match(name):
            shutil.rmtree(folder.path / name, ignore_errors=True)


def _remove_previous_build(folder: _Folder) -> None:
    """Delete the previous build's files, its manifest first (so no reader trusts a half-removed
    build); the journal stays, now the current build's."""
    names = [name for name in folder.owned if name != JOURNAL_NAME and not WORK_DIR.match(name)]
    for name in sorted(names, key=lambda name: name != MANIFEST_NAME):
        (folder.path / name).unlink(missing_ok=True)


def _write_shard(path: Path, sequences: np.ndarray, rows: np.ndarray, sequences_per_member: int,
                 dtype: str) -> ShardInfo:
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
    with open(tmp, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    os.replace(tmp, path)
    return ShardInfo(path.name, len(rows), path.stat().st_size, sha256)


def write_token_shards(out_dir: str | Path, splits: dict[str, PackedSplit], *,
                       tokenizer_fingerprint: str, vocab_size: int, seed: int = 0,
                       tokens_per_member: int = DEFAULT_TOKENS_PER_MEMBER,
                       shard_tokens: int = DEFAULT_SHARD_TOKENS,
                       min_shards: int = DEFAULT_MIN_SHARDS, build: dict | None = None,
                       progress: bool = False) -> Manifest:
    """Write packed splits ({"train": ..., "val": ...}) as shards plus manifest.json into a
    folder holding none of those names (a DataError names the first that exists).

    Sequences are shuffled once with `seed` (so every shard samples the whole corpus) and
    dealt into equal shards; the few left over (< number of shards) are dropped and counted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seq_len = next(iter(splits.values())).sequences.shape[1]
    dtype = token_dtype(vocab_size)
    sequences_per_member = max(1, tokens_per_member // seq_len)
    counts = {split: shard_count(len(packed.sequences), seq_len, shard_tokens, min_shards)
              for split, packed in splits.items()}
    names = {split: [f"{split}-{index:06d}.tar" for index in range(count)]
             for split, count in counts.items()}
    taken = next((name for name in [MANIFEST_NAME, *sum(names.values(), [])]
                  if (out_dir / name).exists()), None)
    if taken is not None:
        raise DataError(f"{out_dir / taken}: already exists; write the shards into an empty "
                        f"folder")
    infos = {}
    for split, packed in splits.items():
        total = len(packed.sequences)
        per_shard = total // counts[split]
        order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(total)
        shards = [_write_shard(out_dir / name, packed.sequences,
                               order[index * per_shard:(index + 1) * per_shard],
                               sequences_per_member, dtype)
                  for index, name in enumerate(tqdm(names[split], desc=f"write {split}",
                                                    disable=not progress))]
        leftover = total - counts[split] * per_shard
        infos[split] = SplitInfo(shards=shards, documents=packed.documents, packed_sequences=total,
                                 dropped_tokens=packed.tail_tokens + leftover * seq_len)
    manifest = Manifest(tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size,
                        seq_len=seq_len, dtype=dtype, sequences_per_member=sequences_per_member,
                        splits=infos, build=build or {})
    manifest.write(out_dir)
    return manifest


def _build_record(files: list[Path], origin: str, val_fraction: float, seed: int,
                  tokens_per_member: int, shard_tokens: int, min_shards: int) -> dict:
    """Who built the shards (AUTOMATIC or BY_HAND) and what determines the output besides
    tokenizer and seq_len (not the paths: a moved corpus is the same corpus)."""
    return {"origin": origin, "input_sha256": corpus_fingerprint(files),
            "input_files": len(files), "val_fraction": val_fraction, "seed": seed,
            "tokens_per_member": tokens_per_member, "shard_tokens": shard_tokens,
            "min_shards": min_shards}


def _check_options(seq_len: int, val_fraction: float, tokens_per_member: int,
                   shard_tokens: int, min_shards: int, workers: int | None) -> None:
    if seq_len < 1 or tokens_per_member < 1 or shard_tokens < 1 or min_shards < 1:
        raise ValueError("seq_len, tokens_per_member, shard_tokens and min_shards must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None: all cores), got {workers}")


def _build(folder: _Folder, files: list[Path], tokenizer: EsoTokenizer, seq_len: int,
           build: dict, workers: int | None, progress: bool) -> Manifest:
    """Tokenize `files` into folder as `build` says, replacing the previous build there (see
    the module docstring for the order of the steps)."""
    out_dir = folder.path
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_work_dirs(folder)
    work_dir = out_dir / f".build-{secrets.token_hex(4)}"
    write_atomically(out_dir / JOURNAL_NAME, json.dumps(
        {"format": JOURNAL_FORMAT, "origin": build["origin"], "work_dir": work_dir.name}))
    try:
        work_dir.mkdir()
        splits = pack_corpus(files, tokenizer.path, seq_len, build["val_fraction"], work_dir,
                             workers or os.cpu_count(), progress)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        if JOURNAL_NAME not in folder.entries:  # nothing else was touched: leave it as it was
            (out_dir / JOURNAL_NAME).unlink()
        raise
    try:
        _remove_previous_build(folder)
        manifest = write_token_shards(
            out_dir, splits, tokenizer_fingerprint=tokenizer.fingerprint,
            vocab_size=tokenizer.vocab_size, seed=build["seed"],
            tokens_per_member=build["tokens_per_member"], shard_tokens=build["shard_tokens"],
            min_shards=build["min_shards"], build=build, progress=progress)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    (out_dir / JOURNAL_NAME).unlink()
    return manifest


def make_shards(inputs: Iterable[str | Path], tokenizer_path: str | Path, seq_len: int,
                out_dir: str | Path, val_fraction: float = 0.01, workers: int | None = None,
                seed: int = 0, tokens_per_member: int = DEFAULT_TOKENS_PER_MEMBER,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, min_shards: int = DEFAULT_MIN_SHARDS,
                progress: bool = True, *, overwrite: bool = False) -> Manifest:
    """Tokenize a corpus (files/directories of .txt/.jsonl, optionally .gz) into train/val
    shards in out_dir. The output depends on the inputs and options, not on `workers`.

    out_dir must be missing, empty or hold only the leftovers of an interrupted build, unless
    `overwrite`: then the previous shard build there is replaced and other files are kept.
    """
    _check_options(seq_len, val_fraction, tokens_per_member, shard_tokens, min_shards, workers)
    folder = _survey(Path(out_dir))
    _check_hand_build_may_write(folder, overwrite)
    files = find_corpus_files(inputs)
    build = _build_record(files, BY_HAND, val_fraction, seed, tokens_per_member, shard_tokens,
                          min_shards)
    return _build(folder, files, load_tokenizer(tokenizer_path), seq_len, build, workers,
                  progress)


@contextmanager
def _automatic_build_folder(out_dir: Path):
    """Survey out_dir; when the automatic build may write there, hold an exclusive lock on
    out_dir/.lock (concurrent ensure_shards calls build once) and survey it again under the
    lock. A folder it may not write to gets nothing written, not even the lock file."""
    folder = _survey(out_dir)
    if not folder.automatic:
        yield folder
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_NAME, "a") as lock:  # "a": never truncate an existing file
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield _survey(out_dir)


def _other_shards(folder: _Folder, seq_len: int, tokenizer_fingerprint: str) -> Manifest:
    """A folder the automatic build may not write to: its shards when they fit the run, else
    a DataError saying what to do."""
    if MANIFEST_NAME not in folder.entries:
        raise DataError(f"{folder.path} is not empty ({_listing(folder.entries)}) and holds no "
                        f"shards; point data.shard_dir at an empty or new folder for the "
                        f"automatic build of data.corpus")
    manifest = read_manifest(folder.path)
    if (manifest.seq_len, manifest.tokenizer_fingerprint) != (seq_len, tokenizer_fingerprint):
        raise DataError(f"{folder.path} holds other shards (seq_len={manifest.seq_len}, "
                        f"tokenizer {manifest.tokenizer_fingerprint[:12]}), not an automatic "
                        f"build of data.corpus; set data.corpus=[] to train on them, or point "
                        f"data.shard_dir at an empty folder to build data.corpus there")
    logger.warning("%s holds shards that were not built from data.corpus; training on them as "
                   "they are (set data.corpus=[] to say so)", folder.path)
    return manifest


def ensure_shards(corpus_paths: Iterable[str | Path], tokenizer_path: str | Path, seq_len: int,
                  out_dir: str | Path, val_fraction: float = 0.01, *, seed: int = 0,
                  tokens_per_member: int = DEFAULT_TOKENS_PER_MEMBER,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, min_shards: int = DEFAULT_MIN_SHARDS,
                  workers: int | None = None, progress: bool = False) -> Manifest:
    """The automatic build (the trainer's, of data.corpus): return out_dir's manifest, building
    the shards first unless out_dir holds this build already (same corpus content, tokenizer,
    seq_len and options).

    It writes only into a missing or empty folder or over its own previous automatic build
    (recorded as origin "ensure_shards" in the manifest or journal). Any other folder is left
    untouched: its shards are used as they are when their seq_len and tokenizer match the run,
    else refused with a DataError.
    """
    _check_options(seq_len, val_fraction, tokens_per_member, shard_tokens, min_shards, workers)
    tokenizer = load_tokenizer(tokenizer_path)
    with _automatic_build_folder(Path(out_dir)) as folder:
        if not folder.automatic:
            return _other_shards(folder, seq_len, tokenizer.fingerprint)
        folder.check_no_stray_shard_files()
        files = find_corpus_files(corpus_paths)
        wanted = _build_record(files, AUTOMATIC, val_fraction, seed, tokens_per_member,
                               shard_tokens, min_shards)
        try:
            manifest = read_manifest(folder.path)
            if (manifest.seq_len, manifest.tokenizer_fingerprint, manifest.build) == (
                    seq_len, tokenizer.fingerprint, wanted):
                return manifest
        except DataError:
            pass  # missing or unreadable: build it
        return _build(folder, files, tokenizer, seq_len, wanted, workers, progress)
