"""The shard reader: exactly-once splitting by DP rank, identical batches within a replica,
seeded order, exact resume in a new process, and bad-input errors (the layout-independent
global order itself: tests/test_data_order.py).

Shards here hold synthetic sequences whose first two tokens encode a unique id, written by
the real shard writer, so every delivered sequence can be traced."""

import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from esolm_dist.data.errors import DataError
from esolm_dist.data.loader import build_loader
from esolm_dist.data.manifest import read_manifest
from esolm_dist.data.packing import PackedSplit
from esolm_dist.data.shards import write_token_shards

REPO = Path(__file__).resolve().parents[1]
VOCAB = 4096
SEQ_LEN = 8
FINGERPRINT = "synthetic-tokenizer"


def write_numbered_shards(out_dir: Path, num_shards: int, per_shard: int) -> Path:
    """num_shards x per_shard sequences; sequence i starts with (i % VOCAB, i // VOCAB)."""
    total = num_shards * per_shard
    ids = np.arange(total)
    rows = np.random.default_rng(0).integers(0, VOCAB, (total, SEQ_LEN)).astype(np.uint16)
    rows[:, 0], rows[:, 1] = ids % VOCAB, ids // VOCAB
    write_token_shards(out_dir, {"train": PackedSplit(rows, total, 0),
                                 "val": PackedSplit(rows[:per_shard * 4], total, 0)},
                       tokenizer_fingerprint=FINGERPRINT, vocab_size=VOCAB,
                       tokens_per_member=3 * SEQ_LEN, min_shards=num_shards, shard_tokens=2**30)
    manifest = read_manifest(out_dir)
    assert [len(s.shards) for s in manifest.splits.values()] == [num_shards, min(num_shards, per_shard * 4)]
    return out_dir


def loader(shard_dir, **overrides):
    settings = dict(seq_len=SEQ_LEN, micro_batch_size=4, dp_rank=0, dp_size=1, num_workers=2,
                    seed=0, tokenizer_fingerprint=FINGERPRINT, infinite=True)
    return build_loader(shard_dir, **{**settings, **overrides})


def ids_of(batch) -> list[int]:
    return (batch[:, 0] + VOCAB * batch[:, 1]).tolist()


def take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


@pytest.fixture(scope="module")
def seven_shards(tmp_path_factory):
    """7 shards x 10 sequences: 7 is not divisible by 2 ranks x 2 workers."""
    return write_numbered_shards(tmp_path_factory.mktemp("seven"), 7, 10)


@pytest.mark.parametrize("per_shard", [10, 9])
def test_one_pass_reads_every_sequence_at_most_once_in_equal_full_batches(tmp_path, per_shard):
    shard_dir = write_numbered_shards(tmp_path, 7, per_shard)
    ranks = [loader(shard_dir, dp_rank=r, dp_size=2, infinite=False) for r in (0, 1)]
    delivered = [[ids_of(b) for b in rank] for rank in ranks]
    flat = [i for rank in delivered for batch in rank for i in batch]
    assert len(flat) == len(set(flat))
    full = 7 * per_shard // 8  # batches of 2 ranks x 4: the rest of the pass is dropped
    assert [len(rank) for rank in delivered] == [full, full] == [len(rank) for rank in ranks]
    assert all(len(batch) == 4 for rank in delivered for batch in rank)
    assert len(flat) == 8 * full and set(flat) <= set(range(7 * per_shard))


def test_seed_decides_the_order(seven_shards):
    def first_batches(seed):
        return [ids_of(b) for b in take(iter(loader(seven_shards, seed=seed)), 6)]

    assert first_batches(0) == first_batches(0)
    assert first_batches(0) != first_batches(1)


def test_validation_pass_is_the_same_on_every_call(seven_shards):
    val = loader(seven_shards, split="val", num_workers=1, micro_batch_size=3, infinite=False)
    first, second = [ids_of(b) for b in val], [ids_of(b) for b in val]
    ids = sum(first, [])
    assert first == second and len(ids) == len(set(ids)) == 33 and set(ids) <= set(range(40))
    assert [len(batch) for batch in first] == [3] * 11  # 7 shards x 5 = 35 = 11 x 3 + 2 dropped


def _replica_batches(global_rank: int, shard_dir: str, out: str) -> None:
    """One simulated process of a TP=2 x DP=2 job (megatron order: TP ranks adjacent)."""
    os.environ.update(RANK=str(global_rank), WORLD_SIZE="4", LOCAL_RANK=str(global_rank))
    tp_size, dp_size = 2, 2
    dp_rank = global_rank // tp_size
    stream = iter(loader(shard_dir, dp_rank=dp_rank, dp_size=dp_size))
    np.save(out, np.stack([b.numpy() for b in take(stream, 8)]))  # one epoch


def test_ranks_of_one_replica_get_identical_batches(seven_shards, tmp_path):
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_replica_batches,
                                 args=(rank, str(seven_shards), str(tmp_path / f"{rank}.npy")))
                 for rank in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    batches = [np.load(tmp_path / f"{rank}.npy") for rank in range(4)]
    assert np.array_equal(batches[0], batches[1]) and np.array_equal(batches[2], batches[3])
    replica_ids = [set((b[..., 0] + VOCAB * b[..., 1]).ravel()) for b in (batches[0], batches[2])]
    assert not replica_ids[0] & replica_ids[1]  # the two replicas read different sequences


RESUME_SCRIPT = """
import json, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_data_loader import loader, take
state = json.loads(open({state!r}).read())
resumed = loader({shard_dir!r}, dp_rank=1, dp_size=2)
resumed.load_state_dict(state)
np.save({out!r}, np.stack([b.numpy() for b in take(iter(resumed), 10)]))
"""


def test_resume_in_a_new_process_continues_the_stream(seven_shards, tmp_path):
    original = loader(seven_shards, dp_rank=1, dp_size=2)
    stream = iter(original)
    take(stream, 11)  # past an epoch end (8 batches per epoch), mid-way through a worker turn
    state = original.state_dict()
    expected = np.stack([b.numpy() for b in take(stream, 10)])
    (tmp_path / "state.json").write_text(json.dumps(state))
    script = RESUME_SCRIPT.format(tests=str(REPO / "tests"), state=str(tmp_path / "state.json"),
                                  shard_dir=str(seven_shards), out=str(tmp_path / "resumed.npy"))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), expected)


def test_reiterating_continues_and_other_settings_are_refused(seven_shards):
    reference = [ids_of(b) for b in take(iter(loader(seven_shards)), 9)]
    original = loader(seven_shards)
    stream = iter(original)
    take(stream, 5)  # mid-way through worker 0's first message (its 8 batches)
    state = original.state_dict()
    del stream
    assert [ids_of(b) for b in take(iter(original), 4)] == reference[5:]
    restored = loader(seven_shards)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert [ids_of(b) for b in take(iter(restored), 4)] == reference[5:]
    with pytest.raises(DataError, match=r"seed=0 \(now 1\)"):
        loader(seven_shards, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match=r"split='train' \(now 'val'\)"):
        loader(seven_shards, split="val").load_state_dict(state)


# ---- bad input -------------------------------------------------------------------------

def rewrite_member(path: Path, index: int, name: str, data: bytes) -> None:
    """Rewrite a shard with member `index` replaced by (name, data)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[index] = (name, data)
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as writer:
        for member_name, member_data in members:
            key, ext = member_name.split(".", 1)
            writer.write({"__key__": key, ext: member_data})


def corrupt_header(path: Path, member: int) -> None:
    """Overwrite the name field of a member's tar header (its checksum then fails)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad" * 20)


def truncate(path: Path, member: int) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset_data + 5
    os.truncate(path, offset)


def damage_tokens(path: Path, member: int) -> None:
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset_data
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([VOCAB + 7], "<u2").tobytes())


@pytest.mark.parametrize("damage, message", [
    (lambda p: truncate(p, 2), r"corrupt tar \(unexpected end of data\)"),
    (lambda p: truncate(p, 0), r"corrupt tar"),
    (lambda p: corrupt_header(p, 0), r"corrupt tar \(bad checksum\)"),
    (lambda p: corrupt_header(p, 2), r"2 of 4 members \(truncated or corrupt tar\)"),
    (lambda p: damage_tokens(p, 1), r"token id 4103 >= vocab_size 4096"),
    (lambda p: rewrite_member(p, 1, "000001.uint16", b"\0" * 10),
     r"member 000001.uint16 holds 10 bytes, expected 48 \(3 sequences x 8 uint16 tokens\)"),
    (lambda p: rewrite_member(p, 1, "000001.uint32", b"\0" * 96),
     r"member 000001.uint32 has dtype uint32, the manifest says uint16"),
    (lambda p: rewrite_member(p, 1, "000007.uint16", b"\0" * 48),
     r"member 000007.uint16 where 000001.uint16 was expected"),
    (lambda p: p.unlink(), r"shard listed in the manifest is missing"),
])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_shard_is_named(tmp_path, damage, message, num_workers):
    shard_dir = write_numbered_shards(tmp_path, 4, 10)
    bad = shard_dir / "train-000002.tar"
    reader = loader(shard_dir, infinite=False, num_workers=num_workers)
    damage(bad)  # after the start-up checks: found by the reader
    with pytest.raises(DataError, match=message) as error:
        for _ in reader:
            pass
    assert str(bad) in str(error.value) and "\n" not in str(error.value)
    assert "make_shards.py" in str(error.value) and "skip_corrupt" in str(error.value)


def flip_low_bit_of_a_token(path: Path, member: int) -> None:
    """Change the first token of a member by one, to another id inside the vocabulary."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset_data
    with open(path, "r+b") as f:
        f.seek(offset)
        token = int(np.frombuffer(f.read(2), "<u2")[0])
        f.seek(offset)
        f.write(np.array([token ^ 1], "<u2").tobytes())
    assert (token ^ 1) < VOCAB


@pytest.mark.parametrize("num_workers", [0, 2])
def test_changed_token_is_caught_by_the_checksum(tmp_path, num_workers):
    shard_dir = write_numbered_shards(tmp_path, 4, 10)
    bad = shard_dir / "train-000002.tar"
    flip_low_bit_of_a_token(bad, 1)
    with pytest.raises(DataError, match=r"train-000002\.tar: sha256 [0-9a-f]{16} differs from the "
                                        r"manifest's [0-9a-f]{16} .*make_shards\.py") as error:
        for _ in loader(shard_dir, infinite=False, num_workers=num_workers):
            pass
    assert "\n" not in str(error.value)
    assert hashlib.sha256(bad.read_bytes()).hexdigest()[:16] in str(error.value)


def replaced_pass(shard_dir: Path, bad: int) -> list[int]:
    """Ids of one unshuffled pass over 4 shards when shard `bad` is corrupt: its rows are
    replaced by the same rows of the next shard (read with plain tarfile)."""
    shards = [shard_rows(shard_dir / f"train-{k:06d}.tar") for k in range(4)]
    shards[bad] = shards[(bad + 1) % 4]
    return [i for rows in shards for i in rows]


def test_changed_token_is_a_counted_skip_under_skip_corrupt(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, 4, 10)
    expected = replaced_pass(shard_dir, 3)
    flip_low_bit_of_a_token(shard_dir / "train-000003.tar", 0)
    skipping = loader(shard_dir, infinite=False, num_workers=0, skip_corrupt=True)
    delivered = [i for batch in skipping for i in ids_of(batch)]
    assert delivered == expected and skipping.skipped_shards == 1


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_missing_or_resized_shard_is_found_at_start_up(tmp_path, damage, caplog):
    shard_dir = write_numbered_shards(tmp_path, 4, 10)
    bad = shard_dir / "train-000002.tar"
    size = bad.stat().st_size
    expected = replaced_pass(shard_dir, 2)
    if damage == "delete":
        bad.unlink()
        message = "shard listed in the manifest is missing"
    else:
        os.truncate(bad, size - 512)
        message = rf"{size - 512} bytes, the manifest says {size} \(truncated"
    with pytest.raises(DataError, match=rf"train-000002\.tar: {message}.* \(1 of 4 train shards "
                                        rf"missing or of the wrong size\); rebuild") as error:
        loader(shard_dir)  # before any batch is read
    assert str(bad) in str(error.value) and "\n" not in str(error.value)
    with caplog.at_level(logging.WARNING, logger="esolm_dist.data.loader"):
        skipping = loader(shard_dir, infinite=False, num_workers=0, skip_corrupt=True)
    assert "1 of 4 train shards missing or of the wrong size" in caplog.text
    assert [i for batch in skipping for i in ids_of(batch)] == expected


def test_old_manifest_without_checksums_is_refused(tmp_path):
    shard_dir = write_numbered_shards(tmp_path, 4, 10)
    record = json.loads((shard_dir / "manifest.json").read_text())
    record["format"] = "esolm-token-shards/1"
    for split in record["splits"].values():
        split["shards"] = [{"name": s["name"], "sequences": s["sequences"]} for s in split["shards"]]
    (shard_dir / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"manifest\.json: format 'esolm-token-shards/1', this "
                                        r"version reads 'esolm-token-shards/2' .*; rebuild"):
        loader(shard_dir)


def shard_rows(path: Path) -> list[int]:
    """Ids of the sequences in one shard in stored order, read with plain tarfile."""
    with tarfile.open(path) as tar:
        rows = np.concatenate([np.frombuffer(tar.extractfile(m).read(), "<u2")
                               for m in tar.getmembers()]).reshape(-1, SEQ_LEN)
    return ids_of(rows.astype(np.int64))


def test_skip_corrupt_skips_the_shard_with_a_counted_warning(tmp_path, caplog):
    shard_dir = write_numbered_shards(tmp_path, 4, 10)
    bad = shard_dir / "train-000001.tar"
    expected = replaced_pass(shard_dir, 1)
    corrupt_header(bad, 1)
    for num_workers in (0, 2):
        skipping = loader(shard_dir, infinite=False, num_workers=num_workers, skip_corrupt=True,
                          micro_batches_per_message=1)
        with caplog.at_level(logging.WARNING, logger="esolm_dist.data.loader"):
            delivered = [i for batch in skipping for i in ids_of(batch)]
        assert delivered == expected and skipping.skipped_shards == 1
    warnings = [r.getMessage() for r in caplog.records]  # from the in-process (0 workers) run
    assert len(warnings) == 1 and "skipped corrupt shard (1 so far" in warnings[0]
    assert str(bad) in warnings[0]
    for shard in shard_dir.glob("train-*.tar"):
        truncate(shard, 0)
    with pytest.raises(DataError, match="every shard of the split is corrupt"):
        next(iter(loader(shard_dir, num_workers=0, skip_corrupt=True)))


def test_manifest_must_match_the_run(seven_shards):
    with pytest.raises(DataError, match=r"tokenizer synthetic-to.* but the run uses other"):
        loader(seven_shards, tokenizer_fingerprint="other")
    with pytest.raises(DataError, match=r"seq_len=8 but the run uses seq_len=16"):
        loader(seven_shards, seq_len=16)
    with pytest.raises(DataError, match=r"manifest.json: no manifest"):
        loader(seven_shards / "missing")


def test_global_batch_must_split_into_micro_batches_per_rank(seven_shards):
    with pytest.raises(ValueError, match=r"global_batch_size a multiple of dp_size x "
                                         r"micro_batch_size; .*global_batch_size=12"):
        loader(seven_shards, dp_size=2, global_batch_size=12)
