"""Building shards: wrap packing with EOS, the validation split, equal shards, determinism,
ensure_shards' rebuild rule, and crash safety of an interrupted build."""

import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from esolm_dist.data.corpus import BUNDLED_CORPUS, iter_documents
from esolm_dist.data.errors import DataError
from esolm_dist.data.loader import build_loader
from esolm_dist.data.manifest import read_manifest
from esolm_dist.data.shards import ensure_shards, make_shards
from esolm_dist.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory mixing the supported formats, plus a file the builder must ignore."""
    chapters = list(iter_documents([next(BUNDLED_CORPUS.glob("*.jsonl.gz"))]))[:60]
    root = tmp_path_factory.mktemp("corpus")
    (root / "nested").mkdir()
    (root / "a.txt").write_text(chapters[0])
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": c, "id": i}) + "\n" for i, c in enumerate(chapters[1:50]))
    (root / "nested" / "c.jsonl").write_text(
        "".join(json.dumps({"text": c}) + "\n\n" for c in chapters[50:59]))
    with gzip.open(root / "nested" / "d.txt.gz", "wt") as f:
        f.write(chapters[59])
    (root / "README.md").write_text("not part of the corpus")
    return root, chapters  # sorted file order: a, b, nested/c, nested/d == chapter order


def shard_rows(out_dir: Path, split: str) -> list[np.ndarray]:
    """Every sequence in a split's shards, read with plain tarfile (independent of the reader)."""
    manifest = read_manifest(out_dir)
    rows = []
    for shard in manifest.splits[split].shards:
        with tarfile.open(out_dir / shard.name) as tar:
            for member in tar.getmembers():
                tokens = np.frombuffer(tar.extractfile(member).read(), "<u2")
                rows += list(tokens.reshape(-1, manifest.seq_len))
    return rows


def test_wrap_packing_split_and_equal_shards(corpus, tokenizer, tmp_path):
    root, chapters = corpus
    seq_len = 64
    manifest = make_shards([root], BUNDLED_TOKENIZER, seq_len, tmp_path, val_fraction=0.1,
                           workers=2, min_shards=3, tokens_per_member=200, progress=False)
    val_docs = [chapters[i] for i in (9, 19, 29, 39, 49, 59)]  # every 10th, by position
    train_docs = [c for c in chapters if c not in val_docs]
    for split, docs in (("train", train_docs), ("val", val_docs)):
        stream = [t for doc in docs for t in tokenizer.encode(doc) + [tokenizer.eos_id]]
        windows = {tuple(stream[i:i + seq_len]) for i in range(0, len(stream) - seq_len + 1,
                                                                  seq_len)}
        rows = [tuple(row) for row in shard_rows(tmp_path, split)]
        info = manifest.splits[split]
        assert len(rows) == len(set(rows)) == info.sequences  # no window written twice
        assert set(rows) <= windows  # every row is one consecutive window of the stream
        assert info.packed_sequences == len(stream) // seq_len == len(windows)
        assert info.dropped_tokens == len(stream) - info.sequences * seq_len
        assert info.documents == len(docs)
        assert len({s.sequences for s in info.shards}) == 1 and len(info.shards) >= 3
        assert info.packed_sequences - info.sequences < len(info.shards)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert (on_disk["seq_len"], on_disk["dtype"]) == (seq_len, "uint16")
    assert on_disk["total_tokens"] == sum(s.sequences for s in manifest.splits.values()) * seq_len
    assert on_disk["splits"]["train"]["shards"][0] == {"name": "train-000000.tar",
                                                     "sequences": manifest.splits["train"].shards[0].sequences}
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert tar.getnames()[:2] == ["000000.uint16", "000001.uint16"]
        assert tar.getmembers()[0].size == 3 * seq_len * 2  # 200 // 64 sequences per member


def test_rebuild_is_byte_identical_whatever_the_worker_count(corpus, tmp_path):
    root, _ = corpus
    for out, workers in (("one", 1), ("two", 2)):
        make_shards([root], BUNDLED_TOKENIZER, 32, tmp_path / out, val_fraction=0.2,
                    workers=workers, progress=False)
    one, two = sorted((tmp_path / "one").iterdir()), sorted((tmp_path / "two").iterdir())
    assert [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two, strict=True))


def test_ensure_shards_builds_only_when_inputs_change(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "shards"
    first = ensure_shards([root], BUNDLED_TOKENIZER, 32, out, val_fraction=0.2)
    built_at = (out / "manifest.json").stat().st_mtime_ns
    assert ensure_shards([root], BUNDLED_TOKENIZER, 32, out, val_fraction=0.2) == first
    assert (out / "manifest.json").stat().st_mtime_ns == built_at
    assert ensure_shards([root], BUNDLED_TOKENIZER, 48, out, val_fraction=0.2).seq_len == 48
    (root / "nested" / "c.jsonl").write_text(json.dumps({"text": "A new document."}) + "\n")
    rebuilt = ensure_shards([root], BUNDLED_TOKENIZER, 48, out, val_fraction=0.2)
    assert rebuilt.build["input_sha256"] != first.build["input_sha256"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "fine"}\n{"title": "no text"}\n', r"bad\.jsonl:2: not a JSON object"),
    ("bad.txt", b"\xff\xfe latin", r"bad\.txt: not UTF-8"),
    ("notes.md", "hello", r"notes\.md: unsupported corpus file"),
])
def test_bad_corpus_file_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        make_shards([path], BUNDLED_TOKENIZER, 16, tmp_path / "out", progress=False)


def test_too_little_text_for_a_validation_sequence(tmp_path):
    (tmp_path / "tiny.txt").write_text("Jesus wept. " * 40)
    with pytest.raises(DataError, match="val split has 0 tokens from 0 documents"):
        make_shards([tmp_path / "tiny.txt"], BUNDLED_TOKENIZER, 16, tmp_path / "out",
                    val_fraction=0.5, progress=False)


def test_interrupted_build_leaves_nothing_a_reader_accepts(corpus, tokenizer, tmp_path):
    root, _ = corpus
    out = tmp_path / "shards"
    make_shards([root], BUNDLED_TOKENIZER, 32, out, val_fraction=0.1, progress=False)
    # Rebuild with one sequence per member (slow to write) and kill it mid-shard.
    script = (f"from esolm_dist.data.shards import make_shards; make_shards([{str(root)!r}], "
              f"{str(BUNDLED_TOKENIZER)!r}, 16, {str(out)!r}, val_fraction=0.1, "
              f"tokens_per_member=16, min_shards=2, workers=1, progress=False)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    build = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar.tmp")) and build.poll() is None:
        assert time.monotonic() < deadline, "the build never started writing shards"
        time.sleep(0.002)
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert build.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    for seq_len in (16, 32):  # neither the new nor the old dataset may be read
        with pytest.raises(DataError, match="no manifest"):
            build_loader(out, seq_len=seq_len, micro_batch_size=1, num_workers=0,
                         tokenizer_fingerprint=tokenizer.fingerprint)
    make_shards([root], BUNDLED_TOKENIZER, 16, out, val_fraction=0.1, tokens_per_member=16,
                min_shards=2, workers=1, progress=False)
    assert not list(out.glob("*.tmp")) and not (out / ".build").exists()
    clean = tmp_path / "clean"
    make_shards([root], BUNDLED_TOKENIZER, 16, clean, val_fraction=0.1, tokens_per_member=16,
                min_shards=2, workers=1, progress=False)
    assert sorted(p.name for p in clean.iterdir()) == sorted(
        p.name for p in out.iterdir() if p.name != ".lock")
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in clean.iterdir())
