"""manifest.json: what a shard directory holds, written last so its presence means "complete".

Shard layout: every shard of a split holds the same number of sequences; a tar member
``NNNNNN.<dtype>`` holds ``sequences_per_member`` sequences of ``seq_len`` raw little-endian
token ids, except the last member of a shard, which holds the rest. The manifest records each
shard file's size in bytes and the sha256 of its bytes (what ``sha256sum`` prints).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from esolm_dist.atomic_io import write_atomically
from esolm_dist.data.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "esolm-token-shards/2"  # /2: per-shard bytes and sha256


def token_dtype(vocab_size: int) -> str:
    """The narrowest stored dtype for a vocabulary: uint16 up to 65536 ids, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def stored_dtype(dtype: str) -> np.dtype:
    """The on-disk numpy dtype: `dtype` in little-endian byte order."""
    return np.dtype(dtype).newbyteorder("<")


def member_name(index: int, dtype: str) -> str:
    """Tar member name of the index-th member of a shard, e.g. '000003.uint16'."""
    return f"{index:06d}.{dtype}"


def member_sizes(sequences: int, sequences_per_member: int) -> list[int]:
    """Sequences in each member of a shard holding `sequences` sequences."""
    full, rest = divmod(sequences, sequences_per_member)
    return [sequences_per_member] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name, the number of sequences in it, its size and its sha256."""

    name: str
    sequences: int
    bytes: int
    sha256: str

    def file_problem(self, shard_dir: Path) -> str | None:
        """Why shard_dir/name is not this shard (missing, or another size); None if it may be."""
        path = shard_dir / self.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: shard listed in the manifest is missing"
        if size != self.bytes:
            return (f"{path}: {size} bytes, the manifest says {self.bytes} (truncated or "
                    f"replaced since it was built)")
        return None


@dataclass(frozen=True)
class SplitInfo:
    """One split (train or val): its shards and how the packed tokens were counted."""

    shards: list[ShardInfo]
    documents: int
    packed_sequences: int  # complete sequences after wrap packing, before equal sharding
    dropped_tokens: int  # the packing tail plus the sequences left over by equal sharding

    @property
    def sequences(self) -> int:
        return sum(shard.sequences for shard in self.shards)


@dataclass(frozen=True)
class Manifest:
    """Everything a reader must agree with before it reads a shard."""

    tokenizer_fingerprint: str
    vocab_size: int
    seq_len: int
    dtype: str
    sequences_per_member: int
    splits: dict[str, SplitInfo]
    build: dict = field(default_factory=dict)  # how it was built; ensure_shards compares it

    @property
    def total_tokens(self) -> int:
        return sum(s.sequences for s in self.splits.values()) * self.seq_len

    def to_json(self) -> str:
        record = {"format": FORMAT, **asdict(self), "total_tokens": self.total_tokens}
        for name, split in self.splits.items():
            record["splits"][name].update(sequences=split.sequences,
                                          tokens=split.sequences * self.seq_len)
        return json.dumps(record, indent=1)

    def write(self, out_dir: Path) -> Path:
        """Atomically write out_dir/manifest.json."""
        path = Path(out_dir) / MANIFEST_NAME
        write_atomically(path, self.to_json())
        return path

    def check_matches(self, path: Path, seq_len: int, tokenizer_fingerprint: str) -> None:
        """Raise DataError when the run's seq_len or tokenizer differs from the shards'."""
        if seq_len != self.seq_len:
            raise DataError(f"{path}: shards hold seq_len={self.seq_len} but the run uses "
                            f"seq_len={seq_len}; rebuild with tools/make_shards.py "
                            f"--seq-len {seq_len} or set the run's seq_len to {self.seq_len}")
        if tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise DataError(f"{path}: shards were tokenized with tokenizer "
                            f"{self.tokenizer_fingerprint[:12]} but the run uses "
                            f"{tokenizer_fingerprint[:12]}; rebuild with tools/make_shards.py "
                            f"--tokenizer <the run's tokenizer.json>")


def read_manifest(shard_dir: str | Path) -> Manifest:
    """Load shard_dir/manifest.json; a missing or malformed one is a DataError."""
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest (shards missing or their build was interrupted); "
                        f"build them with tools/make_shards.py --out {shard_dir}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest ({exc}); rebuild the shards with "
                        f"tools/make_shards.py") from None
    if record.get("format") != FORMAT:
        raise DataError(f"{path}: format {record.get('format')!r}, this version reads {FORMAT!r} "
                        f"(shards with sizes and checksums); rebuild the shards with "
                        f"tools/make_shards.py --overwrite --out {shard_dir} (an automatic "
                        f"build of data.corpus: delete {shard_dir} and rerun)")
    try:
        splits = {name: _split_from_record(split) for name, split in record["splits"].items()}
        manifest = Manifest(**{k: record[k] for k in Manifest.__dataclass_fields__ if k != "splits"},
                            splits=splits)
        np.dtype(manifest.dtype)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed manifest (missing or bad field {exc}); rebuild the "
                        f"shards with tools/make_shards.py") from None
    return manifest


def _split_from_record(record: dict) -> SplitInfo:
    """A SplitInfo from its JSON record (derived totals in the record are ignored)."""
    fields = {k: record[k] for k in SplitInfo.__dataclass_fields__ if k != "shards"}
    return SplitInfo(shards=[ShardInfo(**shard) for shard in record["shards"]], **fields)
