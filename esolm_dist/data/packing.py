"""Corpus -> packed token sequences: parallel tokenization, the validation split, wrap packing.

Wrap packing (as the Eso-LM paper does for OpenWebText): each document's tokens are followed
by EOS, documents are concatenated in corpus order, and the stream is cut into consecutive
sequences of seq_len tokens. A document may span two sequences; the incomplete tail of the
stream is dropped. Validation documents are chosen by position (see `is_val_document`), so the
two splits never share a document.
"""

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from esolm_dist.data.corpus import iter_documents
from esolm_dist.data.errors import DataError
from esolm_dist.data.manifest import token_dtype
from esolm_dist.data.tokenizer import EsoTokenizer, load_tokenizer

DOCUMENTS_PER_TASK = 256


@dataclass(frozen=True)
class PackedSplit:
    """The packed sequences of one split, [N, seq_len], plus how they were counted."""

    sequences: np.ndarray
    documents: int
    tail_tokens: int  # tokens after the last complete sequence, dropped


def is_val_document(index: int, val_fraction: float) -> bool:
    """Document `index` goes to validation when it crosses a multiple of 1/val_fraction: an
    evenly spread, exactly sized (floor(n * val_fraction) of n), order-only selection."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    """Group documents into tokenization tasks."""
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == DOCUMENTS_PER_TASK:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_with_eos(tokenizer: EsoTokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text followed by EOS, in the manifest's token dtype."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = [tokenizer.eos_id]
    return [np.array(ids + eos, dtype=dtype) for ids in tokenizer.encode_batch(texts)]


_worker_tokenizer: EsoTokenizer | None = None  # set in each tokenization worker process


def _load_worker_tokenizer(tokenizer_path: str) -> None:
    """Pool initializer: one single-threaded tokenizer per worker process."""
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode_with_eos(_worker_tokenizer, texts)


def _tokenized(batches: Iterator[list[str]], tokenizer_path: Path,
               workers: int) -> Iterator[list[np.ndarray]]:
    """Tokenize batches in order, in `workers` processes (1: in this process), keeping at
    most two tasks per worker in flight so memory stays bounded on any corpus size."""
    if workers <= 1:
        tokenizer = load_tokenizer(tokenizer_path)
        yield from (_encode_with_eos(tokenizer, batch) for batch in batches)
        return
    # spawn, not fork: the trainer builds shards from a process that already runs torch, gloo and
    # tokenizers threads, and a forked child can inherit one of their locks held (a deadlock seen in CI)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _load_worker_tokenizer, (str(tokenizer_path),)) as pool:
        in_flight = deque()
        for batch in batches:
            in_flight.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


def pack_corpus(files: list[Path], tokenizer_path: Path, seq_len: int, val_fraction: float,
                work_dir: Path, workers: int = 1, progress: bool = True) -> dict[str, PackedSplit]:
    """Tokenize `files` and wrap-pack each split into a memmap of [N, seq_len] sequences
    stored in work_dir. Returns {"train": ..., "val": ...} ("val" only if val_fraction > 0)."""
    split_names = ["train", "val"] if val_fraction > 0 else ["train"]
    dtype = token_dtype(load_tokenizer(tokenizer_path).vocab_size)
    streams = {name: open(work_dir / f"{name}.tokens", "wb") for name in split_names}
    documents = dict.fromkeys(split_names, 0)
    total_bytes = sum(f.stat().st_size for f in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize",
              disable=not progress) as bar:
        texts = iter_documents(files, on_read=bar.update)
        for batch in _tokenized(_batches(texts), tokenizer_path, workers):
            chunks = {name: [] for name in split_names}
            for tokens in batch:
                split = "val" if is_val_document(sum(documents.values()), val_fraction) else "train"
                chunks[split].append(tokens)
                documents[split] += 1
            for name, arrays in chunks.items():
                if arrays:
                    np.concatenate(arrays).tofile(streams[name])
    for stream in streams.values():
        stream.close()
    return {name: _wrap(work_dir / f"{name}.tokens", name, dtype, seq_len, documents[name])
            for name in split_names}


def _wrap(stream_path: Path, split: str, dtype: str, seq_len: int, documents: int) -> PackedSplit:
    """View a token stream file as consecutive [N, seq_len] sequences (wrap packing)."""
    tokens = stream_path.stat().st_size // np.dtype(dtype).itemsize
    count = tokens // seq_len
    if count == 0:
        raise DataError(f"{stream_path}: the {split} split has {tokens} tokens from {documents} "
                        f"documents, less than one sequence of {seq_len}; add text, lower "
                        f"--seq-len{' or raise --val-fraction' if split == 'val' else ''}")
    sequences = np.memmap(stream_path, dtype=dtype, mode="r", shape=(count, seq_len))
    return PackedSplit(sequences, documents, tokens - count * seq_len)
