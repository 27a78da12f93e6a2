"""Small files replaced atomically: a reader sees the old content or the new, never a torn write."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write a text file under a temporary name (path + ".tmp", which a shard build recognises as its
    own leftover), fsync it, rename it to path. One writer per path (the run lock, the shard-folder lock)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
