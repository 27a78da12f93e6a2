"""Building shards: wrap packing with EOS, the validation split, equal shards, determinism,
ensure_shards' rebuild rule, crash safety of an interrupted build, and that no build deletes
or overwrites a file it did not write."""

import gzip
import hashlib
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
    for split in ("train", "val"):
        for index, shard in enumerate(on_disk["splits"][split]["shards"]):
            data = (tmp_path / f"{split}-{index:06d}.tar").read_bytes()
            assert shard == {"name": f"{split}-{index:06d}.tar",
                             "sequences": manifest.splits[split].shards[0].sequences,
                             "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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
    assert list((tmp_path / "out").glob("*")) == []  # a failed build leaves nothing behind


def test_too_little_text_for_a_validation_sequence(tmp_path):
    (tmp_path / "tiny.txt").write_text("Jesus wept. " * 40)
    with pytest.raises(DataError, match="val split has 0 tokens from 0 documents"):
        make_shards([tmp_path / "tiny.txt"], BUNDLED_TOKENIZER, 16, tmp_path / "out",
                    val_fraction=0.5, progress=False)


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), the lock file left out."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("builder", [make_shards, ensure_shards])
def test_interrupted_build_leaves_nothing_a_reader_accepts(corpus, tokenizer, tmp_path, builder):
    root, _ = corpus
    out = tmp_path / "shards"
    # One sequence per member: slow to write, so the build can be killed mid-shard.
    options = dict(val_fraction=0.1, tokens_per_member=16, min_shards=16, workers=1,
                   progress=False)
    builder([root], BUNDLED_TOKENIZER, 32, out, **options)
    replace = ", overwrite=True" if builder is make_shards else ""
    script = (f"from esolm_dist.data.shards import {builder.__name__}; {builder.__name__}("
              f"[{str(root)!r}], {str(BUNDLED_TOKENIZER)!r}, 16, {str(out)!r}, "
              f"**{options!r}{replace})")
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
    # The leftovers are recognised as a build's own: rebuilt over without --overwrite.
    builder([root], BUNDLED_TOKENIZER, 16, out, **options)
    builder([root], BUNDLED_TOKENIZER, 16, tmp_path / "clean", **options)
    assert listing(out) == listing(tmp_path / "clean")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # no work folder left


# ---- a build never deletes or overwrites what it did not write -------------------------

def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file and the name of every folder under folder (the whole tree)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


@pytest.fixture()
def users_shards(corpus, tmp_path):
    """A folder of shards a user built by hand, next to a file and a .build folder of theirs."""
    root, _ = corpus
    folder = tmp_path / "mine"
    make_shards([root], BUNDLED_TOKENIZER, 32, folder, val_fraction=0.2, progress=False)
    (folder / "notes.txt").write_text("my notes")
    (folder / ".build").mkdir()
    (folder / ".build" / "keep.bin").write_bytes(b"\0keep")
    return folder


def test_automatic_build_uses_a_users_matching_shards_as_they_are(corpus, users_shards):
    root, _ = corpus
    before = hashes(users_shards)
    manifest = ensure_shards([root / "b.jsonl.gz"], BUNDLED_TOKENIZER, 32, users_shards, 0.2)
    assert hashes(users_shards) == before  # nothing deleted, rebuilt or added (not even a lock)
    assert manifest == read_manifest(users_shards)


def test_automatic_build_refuses_a_users_other_shards(corpus, users_shards):
    root, _ = corpus
    before = hashes(users_shards)
    with pytest.raises(DataError, match=r"mine holds other shards \(seq_len=32, tokenizer "
                                        r"[0-9a-f]{12}\), .*set data\.corpus=\[\] to train on"):
        ensure_shards([root], BUNDLED_TOKENIZER, 48, users_shards, 0.2)
    assert hashes(users_shards) == before


def test_automatic_build_refuses_a_folder_of_other_files(corpus, tmp_path):
    root, _ = corpus
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "thesis.txt").write_text("not shards")
    (folder / "train-000000.tar").write_bytes(b"someone else's tar")
    before = hashes(folder)
    with pytest.raises(DataError, match=r"papers is not empty \(thesis\.txt, train-000000\.tar\) "
                                        r"and holds no shards; point data\.shard_dir at an empty"):
        ensure_shards([root], BUNDLED_TOKENIZER, 32, folder)
    assert hashes(folder) == before


def test_make_shards_refuses_a_folder_that_is_not_empty(corpus, users_shards, tmp_path):
    root, _ = corpus
    before = hashes(users_shards)
    with pytest.raises(DataError, match=r"mine already holds a shard build \(manifest\.json\); "
                                        r"pass --overwrite"):
        make_shards([root], BUNDLED_TOKENIZER, 16, users_shards, progress=False)
    assert hashes(users_shards) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"already holds other files \(tokenizer\.json\)"):
        make_shards([root], BUNDLED_TOKENIZER, 16, other, progress=False)
    assert hashes(other) == {"tokenizer.json": hashlib.sha256(b"{}").hexdigest()}


def test_overwrite_never_touches_files_no_build_listed(corpus, users_shards):
    root, _ = corpus
    (users_shards / "manifest.json").rename(users_shards / "manifest.saved")  # now unlisted
    before = hashes(users_shards)
    with pytest.raises(DataError, match=r"train-000000\.tar: not listed by a shard build"):
        make_shards([root], BUNDLED_TOKENIZER, 16, users_shards, progress=False, overwrite=True)
    assert hashes(users_shards) == before


def test_overwrite_replaces_only_the_previous_build(corpus, users_shards):
    root, _ = corpus
    old = read_manifest(users_shards)
    old_names = {s.name for split in old.splits.values() for s in split.shards}
    kept = {name: digest for name, digest in hashes(users_shards).items()
            if name.split("/")[0] in ("notes.txt", ".build")}
    new = make_shards([root], BUNDLED_TOKENIZER, 64, users_shards, val_fraction=0.2,
                      min_shards=2, shard_tokens=2**30, progress=False, overwrite=True)
    new_names = {s.name for split in new.splits.values() for s in split.shards}
    assert len(new_names) < len(old_names)  # the old build had shards the new one has not
    after = hashes(users_shards)
    assert set(after) == {"manifest.json", *new_names, *kept}  # old shards gone, no leftovers
    assert {name: after[name] for name in kept} == kept


def test_bundled_quickstart_build_is_reused(tmp_path):
    out = tmp_path / "quickstart"
    first = ensure_shards([BUNDLED_CORPUS], BUNDLED_TOKENIZER, 32, out, 0.05)
    built = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert ensure_shards([BUNDLED_CORPUS], BUNDLED_TOKENIZER, 32, out, 0.05) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == built
    assert first.build["origin"] == "ensure_shards"


def test_overwrite_keeps_a_file_a_manifest_lists_but_no_build_writes(corpus, users_shards):
    root, _ = corpus
    record = json.loads((users_shards / "manifest.json").read_text())
    record["splits"]["train"]["shards"][0]["name"] = "notes.txt"  # a hand-edited manifest
    (users_shards / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"train-000000\.tar: not listed by a shard build"):
        make_shards([root], BUNDLED_TOKENIZER, 16, users_shards, progress=False, overwrite=True)
    assert (users_shards / "notes.txt").read_text() == "my notes"
