"""Reading a user corpus: which files it holds, the documents in them, and a content hash.

A corpus is any mix of files and directories (searched recursively, in sorted order) with
these suffixes, optionally gzipped:

- ``.txt``: the whole file is one document;
- ``.jsonl``: one JSON object per line, the document in its ``"text"`` field.
"""

import gzip
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm.utils import CallbackIOWrapper

from esolm_dist.data.errors import DataError

DOCUMENT_SUFFIXES = (".txt", ".jsonl")
BUNDLED_CORPUS = Path(__file__).resolve().parent / "assets" / "corpus"


def _document_suffix(path: Path) -> str | None:
    """'.txt' or '.jsonl' for a supported file (gzipped or not), else None."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return next((s for s in DOCUMENT_SUFFIXES if name.endswith(s)), None)


def find_corpus_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and directories into the sorted list of corpus files they hold."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and _document_suffix(p))
        elif not path.exists():
            raise DataError(f"{path}: corpus input not found; pass existing files or directories")
        elif _document_suffix(path) is None:
            raise DataError(f"{path}: unsupported corpus file; use .txt or .jsonl "
                            f"(optionally .gz)")
        else:
            files.append(path)
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no .txt/.jsonl(.gz) files found; "
                        f"point --input at your corpus")
    return files


def corpus_fingerprint(files: Iterable[Path]) -> str:
    """sha256 over the bytes of every file, in order: equal corpora give equal hashes."""
    total = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            total.update(hashlib.file_digest(f, "sha256").digest())
    return total.hexdigest()


def _text_stream(path: Path, raw: BinaryIO, on_read: Callable[[int], None] | None) -> io.TextIOWrapper:
    """UTF-8 text of an open, possibly gzipped file; on_read(n) is told of every n raw bytes."""
    stream = CallbackIOWrapper(on_read, raw, "read") if on_read else raw
    if path.name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    return io.TextIOWrapper(stream, encoding="utf-8")


def _documents_in(path: Path, text: io.TextIOWrapper) -> Iterator[str]:
    """The documents of one open corpus file (see the module docstring)."""
    if _document_suffix(path) == ".txt":
        yield text.read()
        return
    for line_number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            document = None
        if not isinstance(document, str):
            raise DataError(f"{path}:{line_number}: not a JSON object with a string \"text\" "
                            f"field; fix that line or remove it")
        yield document


def iter_documents(files: Iterable[Path],
                   on_read: Callable[[int], None] | None = None) -> Iterator[str]:
    """Every non-empty document of the corpus files, in order."""
    for path in files:
        try:
            with open(path, "rb") as raw:
                text = _text_stream(path, raw, on_read)
                yield from (doc for doc in _documents_in(path, text) if doc)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason}); convert the file to "
                            f"UTF-8") from None
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: unreadable ({exc}); check or re-download the file") from None
