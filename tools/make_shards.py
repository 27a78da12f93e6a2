"""Tokenize a corpus into webdataset token shards for training (see docs/data.md).

    python tools/make_shards.py --input corpus/ more.jsonl.gz --tokenizer tokenizer.json \\
        --seq-len 1024 --out shards/ --val-fraction 0.01 --workers 8

Inputs: files or directories of .txt (one document per file) and .jsonl (one {"text": ...}
per line), optionally gzipped. Output: equal-sized train/val tar shards plus manifest.json, in
a new or empty --out (--overwrite: replace the shard build there, keeping other files).
"""

import argparse
import sys

from esolm_dist.data.errors import DataError
from esolm_dist.data.shards import (
    DEFAULT_MIN_SHARDS,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_TOKENS_PER_MEMBER,
    make_shards,
)
from esolm_dist.data.tokenizer import BUNDLED_TOKENIZER


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def fraction_below_one(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="corpus files or directories (.txt/.jsonl, optionally .gz)")
    parser.add_argument("--tokenizer", default=str(BUNDLED_TOKENIZER),
                        help="tokenizer.json with <|endoftext|> and [MASK] special tokens")
    parser.add_argument("--seq-len", type=at_least_one, required=True,
                        help="tokens per sequence")
    parser.add_argument("--out", required=True, help="output directory for shards + manifest")
    parser.add_argument("--overwrite", action="store_true",
                        help="build into a non-empty --out: replace the shard build there "
                             "(the files its manifest lists), keep other files")
    parser.add_argument("--val-fraction", type=fraction_below_one, default=0.01,
                        help="fraction of documents held out for validation (0: no val split)")
    parser.add_argument("--workers", type=at_least_one, default=None,
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle into shards")
    parser.add_argument("--tokens-per-member", type=at_least_one,
                        default=DEFAULT_TOKENS_PER_MEMBER,
                        help="tokens per tar member (rounded down to whole sequences)")
    parser.add_argument("--shard-tokens", type=at_least_one, default=DEFAULT_SHARD_TOKENS,
                        help="target tokens per shard")
    parser.add_argument("--min-shards", type=at_least_one, default=DEFAULT_MIN_SHARDS,
                        help="least shards per split")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        manifest = make_shards(args.input, args.tokenizer, args.seq_len, args.out,
                               val_fraction=args.val_fraction, workers=args.workers,
                               seed=args.seed, tokens_per_member=args.tokens_per_member,
                               shard_tokens=args.shard_tokens, min_shards=args.min_shards,
                               progress=not args.no_progress, overwrite=args.overwrite)
    except (DataError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for name, split in manifest.splits.items():
        print(f"{name}: {len(split.shards)} shards x {split.shards[0].sequences} sequences of "
              f"{manifest.seq_len} = {split.sequences * manifest.seq_len:,} tokens from "
              f"{split.documents:,} documents ({split.dropped_tokens:,} tokens dropped)")
    print(f"wrote {args.out}/manifest.json: {manifest.total_tokens:,} tokens, {manifest.dtype}")


if __name__ == "__main__":
    main()
