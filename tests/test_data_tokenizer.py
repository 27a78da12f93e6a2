"""The bundled tokenizer and corpus: special tokens, round trips, fingerprints, bad files."""

import gzip
import hashlib
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from esolm_dist.data.corpus import BUNDLED_CORPUS, find_corpus_files, iter_documents
from esolm_dist.data.errors import DataError
from esolm_dist.data.tokenizer import BUNDLED_TOKENIZER, EOS_TOKEN, MASK_TOKEN, load_tokenizer

ENGLISH = ("The quick brown fox jumps over the lazy dog.\n"
           "In the beginning God created the heaven and the earth; naïve café, 3.14 ✓")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_bundled_tokenizer_has_distinct_special_tokens(tokenizer):
    assert tokenizer.vocab_size == 4096
    assert {tokenizer.eos_id, tokenizer.mask_id} <= set(range(tokenizer.vocab_size))
    assert tokenizer.eos_id != tokenizer.mask_id
    assert tokenizer.decode([tokenizer.eos_id]) == EOS_TOKEN


def test_round_trip_is_exact_and_compresses(tokenizer):
    ids = tokenizer.encode(ENGLISH)
    assert tokenizer.decode(ids) == ENGLISH
    assert len(ids) < len(ENGLISH.encode()) / 2  # BPE merges, not bytes
    assert tokenizer.encode_batch([ENGLISH, "amen"]) == [ids, tokenizer.encode("amen")]


def test_special_token_text_in_a_document_stays_plain_text(tokenizer):
    text = f"BERT predicts {MASK_TOKEN} tokens; GPT-2 ends with {EOS_TOKEN}."
    ids = tokenizer.encode(text)
    assert tokenizer.mask_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text


def test_decode_shows_or_drops_masks(tokenizer):
    left, right = tokenizer.encode("Let there be"), tokenizer.encode(" light")
    masked = left + [tokenizer.mask_id] + right
    assert tokenizer.decode(masked) == f"Let there be{MASK_TOKEN} light"
    assert tokenizer.decode(masked, show_masks=False) == "Let there be light"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_fingerprint_is_sha256_of_the_file(tokenizer, tmp_path):
    assert tokenizer.fingerprint == hashlib.sha256(BUNDLED_TOKENIZER.read_bytes()).hexdigest()
    copy = tmp_path / "tok.json"
    copy.write_text(json.dumps(json.loads(BUNDLED_TOKENIZER.read_text()), indent=2))
    assert load_tokenizer(copy).fingerprint != tokenizer.fingerprint


def test_bundled_corpus_is_small_real_english():
    files = find_corpus_files([BUNDLED_CORPUS])
    assert sum(f.stat().st_size for f in files) <= 3 * 2**20
    documents = list(iter_documents(files))
    assert len(documents) == 1189  # KJV chapters
    assert documents[0].startswith("Genesis 1\n\nIn the beginning God created")


@pytest.mark.parametrize("content, message", [
    (None, "cannot read tokenizer"),
    (b"{not json", "not a valid tokenizers JSON"),
    (gzip.compress(b"{}"), "not a valid tokenizers JSON"),
])
def test_unreadable_tokenizer_file_is_named(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        load_tokenizer(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_tokenizer_without_mask_token_is_refused(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([ENGLISH] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN], show_progress=False))
    path = tmp_path / "no_mask.json"
    tok.save(str(path))
    with pytest.raises(DataError, match=r"lacks special token\(s\) \[MASK\]"):
        load_tokenizer(path)
