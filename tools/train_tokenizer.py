"""Train the project's byte-level BPE tokenizer on a corpus (default: the bundled KJV corpus).

Special tokens come first: id 0 = <|endoftext|> (EOS), id 1 = [MASK] (the diffusion mask).

    python tools/train_tokenizer.py --input my_corpus/ --vocab-size 32768 --out tok.json
    python tools/train_tokenizer.py --out esolm_dist/data/assets/tokenizer.json --overwrite
                                                      # regenerates the bundled tokenizer
"""

import argparse
import os
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from esolm_dist.data.corpus import BUNDLED_CORPUS, find_corpus_files, iter_documents
from esolm_dist.data.errors import DataError
from esolm_dist.data.tokenizer import EOS_TOKEN, MASK_TOKEN, load_tokenizer

SMALLEST_VOCAB = 256 + 2  # every byte, plus the two special tokens


def train_byte_level_bpe(documents, vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE (no prefix space) trained on an iterable of texts."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def vocab_size(text: str) -> int:
    """argparse type: an integer >= SMALLEST_VOCAB."""
    value = int(text)
    if value < SMALLEST_VOCAB:
        raise argparse.ArgumentTypeError(f"must be >= {SMALLEST_VOCAB} (256 bytes + 2 special "
                                         f"tokens), got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", default=[BUNDLED_CORPUS],
                        help="corpus files or directories (.txt/.jsonl, optionally .gz)")
    parser.add_argument("--vocab-size", type=vocab_size, default=4096)
    parser.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    try:
        tokenizer = train_byte_level_bpe(iter_documents(find_corpus_files(args.input)),
                                         args.vocab_size)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, args.out)
    print(load_tokenizer(args.out))


if __name__ == "__main__":
    main()
