"""Reading one shard with webdataset's tar iterator, checked against the manifest: member
names, dtype, length and count, token ids inside the vocabulary, and the sha256 of the file's
bytes (hashed as they stream past, so the check reads nothing twice)."""

import hashlib
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from webdataset.tariterators import tar_file_iterator

from esolm_dist.data.errors import DataError
from esolm_dist.data.manifest import Manifest, ShardInfo, member_name, member_sizes, stored_dtype

REBUILD = "rebuild the shards with tools/make_shards.py or set data.skip_corrupt=true"


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


def read_shard(path: Path, shard: ShardInfo, manifest: Manifest) -> np.ndarray:
    """All sequences of one shard as a [sequences, seq_len] array; any defect is a DataError."""
    sizes = member_sizes(shard.sequences, manifest.sequences_per_member)
    dtype = stored_dtype(manifest.dtype)
    tokens = np.empty((shard.sequences, manifest.seq_len), dtype=dtype)
    row = members = 0
    try:
        with open(path, "rb") as raw:
            stream = _HashingReader(raw)
            for members, member in enumerate(tar_file_iterator(stream), start=1):
                if members > len(sizes):
                    raise DataError(f"{path}: more than the manifest's {len(sizes)} members; "
                                    f"{REBUILD}")
                size = sizes[members - 1]
                _check_member(path, member["fname"], member["data"], members - 1, size, manifest)
                tokens[row:row + size] = np.frombuffer(member["data"], dtype).reshape(size, -1)
                row += size
            stream.read()  # the end-of-archive blocks, so the hash covers the whole file
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: shard listed in the manifest is missing; {REBUILD}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        reason = str(exc).splitlines()[0].split(" @ ")[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: corrupt tar ({reason}); {REBUILD}") from None
    if members < len(sizes):
        raise DataError(f"{path}: {members} of {len(sizes)} members (truncated or corrupt tar); "
                        f"{REBUILD}")
    largest = int(tokens.max())
    if largest >= manifest.vocab_size:
        raise DataError(f"{path}: token id {largest} >= vocab_size {manifest.vocab_size} "
                        f"(corrupt data); {REBUILD}")
    digest = stream.sha256.hexdigest()
    if digest != shard.sha256:
        raise DataError(f"{path}: sha256 {digest[:16]} differs from the manifest's "
                        f"{shard.sha256[:16]} (the file changed after it was built); {REBUILD}")
    return tokens
