"""Random access to the sequences of verified shards.

A shard is verified once per process, on first use, in one pass over its bytes: member names,
dtype, length and count, token ids inside the vocabulary, and the sha256 of the file's bytes
(hashed as they stream past). The pass also records where each member's data starts, so rows
are then read straight from a read-only memory map of the tar, in any order.
"""

import hashlib
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import numpy as np

from esolm_dist.data.errors import DataError
from esolm_dist.data.manifest import Manifest, ShardInfo, member_name, member_sizes, stored_dtype

REBUILD = "rebuild the shards with tools/make_shards.py or set data.skip_corrupt=true"
OPEN_SHARDS = 256  # memory maps kept open per process (each holds a file descriptor)


def _check_member(path: Path, name: str, data: bytes, index: int, sequences: int,
                  manifest: Manifest) -> None:
    """Raise DataError unless member `index` is named, typed and sized as the manifest says."""
    expected_name = member_name(index, manifest.dtype)
    if name != expected_name:
        key, _, dtype = name.partition(".")
        if key == expected_name.partition(".")[0]:
            raise DataError(f"{path}: member {name} has dtype {dtype}, the manifest says "
                            f"{manifest.dtype}; {REBUILD}")
        raise DataError(f"{path}: member {name} where {expected_name} was expected (members "
                        f"missing or out of order); {REBUILD}")
    expected_bytes = sequences * manifest.seq_len * np.dtype(manifest.dtype).itemsize
    if len(data) != expected_bytes:
        raise DataError(f"{path}: member {name} holds {len(data)} bytes, expected "
                        f"{expected_bytes} ({sequences} sequences x {manifest.seq_len} "
                        f"{manifest.dtype} tokens); {REBUILD}")


class _HashingReader:
    """A read-only file wrapper that feeds every byte read through it to a sha256."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data


def verify_shard(path: Path, shard: ShardInfo, manifest: Manifest) -> np.ndarray:
    """Check one shard in a single streaming pass; returns the file offset (in tokens) of each
    row. Any defect is a DataError naming the file and the fix."""
    sizes = member_sizes(shard.sequences, manifest.sequences_per_member)
    dtype = stored_dtype(manifest.dtype)
    row_bytes = manifest.seq_len * dtype.itemsize
    starts, members, largest = [], 0, 0
    try:
        with open(path, "rb") as raw:
            stream = _HashingReader(raw)
            # plain (uncompressed) tar stream: member offsets are offsets in the file
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for members, member in enumerate(tar, start=1):
                    if members > len(sizes):
                        raise DataError(f"{path}: more than the manifest's {len(sizes)} members; "
                                        f"{REBUILD}")
                    size = sizes[members - 1]
                    data = tar.extractfile(member).read() if member.isreg() else b""
                    _check_member(path, member.name, data, members - 1, size, manifest)
                    largest = max(largest, int(np.frombuffer(data, dtype).max()))
                    starts.append(member.offset_data + row_bytes * np.arange(size))
                    tar.members = []  # a stream: keep no headers
            stream.read()  # the end-of-archive blocks, so the hash covers the whole file
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: shard listed in the manifest is missing; {REBUILD}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: corrupt tar ({reason}); {REBUILD}") from None
    if members < len(sizes):
        raise DataError(f"{path}: {members} of {len(sizes)} members (truncated or corrupt tar); "
                        f"{REBUILD}")
    if largest >= manifest.vocab_size:
        raise DataError(f"{path}: token id {largest} >= vocab_size {manifest.vocab_size} "
                        f"(corrupt data); {REBUILD}")
    digest = stream.sha256.hexdigest()
    if digest != shard.sha256:
        raise DataError(f"{path}: sha256 {digest[:16]} differs from the manifest's "
                        f"{shard.sha256[:16]} (the file changed after it was built); {REBUILD}")
    return np.concatenate(starts) // dtype.itemsize  # tar data blocks start at multiples of 512


class ShardRows:
    """Rows of a split's shards by (shard, row); each shard is verified on first use (a
    DataError then), afterwards read through a memory map (at most OPEN_SHARDS open)."""

    def __init__(self, shard_dir: Path, manifest: Manifest, shards: list[ShardInfo]):
        self.shard_dir = shard_dir
        self.manifest = manifest
        self.shards = shards
        self._row_starts: dict[int, np.ndarray] = {}  # verified shards
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()  # least recently used first

    def _tokens(self, shard: int) -> np.memmap:
        """The shard's file as a flat token array (verifying it the first time)."""
        if shard in self._maps:
            self._maps.move_to_end(shard)
            return self._maps[shard]
        path = self.shard_dir / self.shards[shard].name
        if shard not in self._row_starts:
            self._row_starts[shard] = verify_shard(path, self.shards[shard], self.manifest)
        if len(self._maps) >= OPEN_SHARDS:
            self._maps.popitem(last=False)
        tokens = np.memmap(path, dtype=stored_dtype(self.manifest.dtype), mode="r")
        self._maps[shard] = tokens
        return tokens

    def check(self, shard: int) -> None:
        """Verify `shard` now (DataError if it is corrupt)."""
        self._tokens(shard)

    def read(self, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[len(rows), seq_len] tokens of (shards[j], rows[j]), in the stored dtype."""
        seq_len = self.manifest.seq_len
        out = np.empty((len(rows), seq_len), dtype=stored_dtype(self.manifest.dtype))
        for j, (shard, row) in enumerate(zip(shards.tolist(), rows.tolist(), strict=True)):
            tokens = self._tokens(shard)
            start = int(self._row_starts[shard][row])
            out[j] = tokens[start:start + seq_len]
        return out
