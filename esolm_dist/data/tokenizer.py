"""The project tokenizer: a byte-level BPE (``tokenizers`` library) with two special tokens,
``<|endoftext|>`` (EOS, separates packed documents) and ``[MASK]`` (the diffusion mask).

Special-token text inside a document is encoded as plain text, never as EOS or MASK, so a
corpus that mentions "[MASK]" cannot smuggle mask tokens into the clean data.
"""

import hashlib
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from esolm_dist.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "[MASK]"
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer.json"


class EsoTokenizer:
    """A loaded tokenizer.json: encode/decode plus the ids and hash the pipeline needs.

    Attributes: vocab_size (special tokens included), eos_id, mask_id, path, and
    fingerprint (sha256 of the tokenizer.json bytes, recorded in shard manifests).
    """

    def __init__(self, tokenizer: Tokenizer, fingerprint: str, path: Path):
        self._tokenizer = tokenizer
        self.path = path
        self.fingerprint = fingerprint
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        self.mask_id = tokenizer.token_to_id(MASK_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no EOS appended)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (no EOS appended)."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], show_masks: bool = True) -> str:
        """Text of token ids. Mask tokens appear as "[MASK]" (show_masks) or are dropped; EOS
        appears as "<|endoftext|>"."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.vocab_size})")
        if not show_masks:
            ids = [i for i in ids if i != self.mask_id]
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"EsoTokenizer({self.path}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"mask_id={self.mask_id}, fingerprint={self.fingerprint[:12]})")


def load_tokenizer(path: str | Path | None = None) -> EsoTokenizer:
    """Load a tokenizer.json (default: the bundled one) and check its special tokens."""
    path = Path(path) if path is not None else BUNDLED_TOKENIZER
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read tokenizer ({exc.strerror}); pass the path of a "
                        f"tokenizer.json made by tools/train_tokenizer.py") from None
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the Rust library raises plain Exception for any parse error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: not a valid tokenizers JSON file ({reason}); regenerate it "
                        f"with tools/train_tokenizer.py") from None
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in (EOS_TOKEN, MASK_TOKEN) if t not in special]
    if missing:
        raise DataError(f"{path}: tokenizer lacks special token(s) {', '.join(missing)}; "
                        f"train it with tools/train_tokenizer.py")
    tokenizer.encode_special_tokens = True
    return EsoTokenizer(tokenizer, hashlib.sha256(raw).hexdigest(), path)
