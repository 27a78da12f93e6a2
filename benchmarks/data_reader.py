"""Tokens/s of the shard reader (build_loader) for 0, 1 and 2 DataLoader workers, beside the
ceiling of slicing the same tokens out of one flat numpy memmap, measured in one run.

    python benchmarks/data_reader.py [--seq-len 1024 --micro-batch 8 --tokens 67108864]

Shards hold random token ids (speed does not depend on the values) and are read from the
page cache right after being written: this measures the reader's CPU cost, not the disk.
Each number is the median of --repeats timed windows of --seconds, after a warm-up batch.
"""

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from esolm_dist.data.loader import build_loader
from esolm_dist.data.packing import PackedSplit
from esolm_dist.data.shards import write_token_shards

VOCAB = 4096
FINGERPRINT = "benchmark"


def tokens_per_second(batches, seconds: float) -> float:
    """Tokens/s over a timed window, after one untimed warm-up batch."""
    next(batches)
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tokens += next(batches).numel()
    return tokens / (time.perf_counter() - start)


def memmap_batches(path: Path, seq_len: int, micro_batch: int):
    """The ceiling: consecutive [B, L] int64 batches sliced from a flat memmap, cycled."""
    flat = np.memmap(path, dtype=np.uint16, mode="r")
    sequences = flat[:len(flat) // seq_len * seq_len].reshape(-1, seq_len)
    while True:
        for start in range(0, len(sequences) - micro_batch + 1, micro_batch):
            yield torch.from_numpy(sequences[start:start + micro_batch].astype(np.int64))


def cpu_model() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if "Model name" in line), "")
    return model or platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2**26, help="tokens in the shards")
    parser.add_argument("--shard-tokens", type=int, default=2**22)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one window")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sequences = np.random.default_rng(0).integers(
            0, VOCAB, (args.tokens // args.seq_len, args.seq_len), dtype=np.uint16)
        manifest = write_token_shards(tmp / "shards", {"train": PackedSplit(sequences, 0, 0)},
                                      tokenizer_fingerprint=FINGERPRINT, vocab_size=VOCAB,
                                      shard_tokens=args.shard_tokens)
        sequences.tofile(tmp / "flat.bin")
        del sequences

        def reader(workers):
            return iter(build_loader(tmp / "shards", seq_len=args.seq_len,
                                     micro_batch_size=args.micro_batch, num_workers=workers,
                                     tokenizer_fingerprint=FINGERPRINT))

        sources = {"flat numpy memmap (ceiling)":
                   lambda: memmap_batches(tmp / "flat.bin", args.seq_len, args.micro_batch)}
        sources.update({f"reader, {w} worker{'s' if w != 1 else ''}"
                        f"{' (in process)' if w == 0 else ''}": (lambda w=w: reader(w))
                        for w in (0, 1, 2)})
        rates = {name: [] for name in sources}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all
            for name, make in sources.items():
                rates[name].append(tokens_per_second(make(), args.seconds))

    ceiling = statistics.median(rates["flat numpy memmap (ceiling)"])
    shards = manifest.splits["train"].shards
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} (1 min, at the end); torch {torch.__version__}")
    print(f"data: {len(shards)} shards x {shards[0].sequences} sequences of {args.seq_len} "
          f"uint16 tokens ({manifest.total_tokens / 1e6:.1f} M tokens), "
          f"{manifest.sequences_per_member * args.seq_len} tokens per tar member; "
          f"batches of {args.micro_batch} x {args.seq_len}; median of {args.repeats} x "
          f"{args.seconds:.0f} s\n")
    print("| source | M tokens/s (median) | runs | % of memmap |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        runs = ", ".join(f"{v / 1e6:.1f}" for v in values)
        median = statistics.median(values)
        print(f"| {name} | {median / 1e6:.1f} | {runs} | {100 * median / ceiling:.0f}% |")


if __name__ == "__main__":
    main()
