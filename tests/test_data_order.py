"""One global data order, independent of the layout: the union of the DP ranks' micro-batches
of every step is the single-process global batch, sequence for sequence, whatever DP size,
micro-batch size, worker count and message grouping; the state is a position in that order.

The expectation is computed from the order's definition (docs of esolm_dist.data.plan) and
the shard files read with plain tarfile, not through the loader."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from esolm_dist.data.errors import DataError
from esolm_dist.data.loader import build_loader
from esolm_dist.data.manifest import read_manifest
from esolm_dist.data.packing import PackedSplit
from esolm_dist.data.shards import write_token_shards

VOCAB = 4096
SEQ_LEN = 8
FINGERPRINT = "synthetic-tokenizer"
SEED = 5
GLOBAL = 16  # train.global_batch_size in these tests


def numbered(count: int, first: int = 0) -> np.ndarray:
    """count sequences; sequence i starts with the id (first + i) in two tokens."""
    ids = np.arange(first, first + count)
    rows = np.random.default_rng(first).integers(0, VOCAB, (count, SEQ_LEN)).astype(np.uint16)
    rows[:, 0], rows[:, 1] = ids % VOCAB, ids // VOCAB
    return rows


def ids_of(batch) -> list[int]:
    batch = np.asarray(batch, dtype=np.int64)
    return (batch[:, 0] + VOCAB * batch[:, 1]).tolist()


def stored_ids(shard_dir: Path, split: str) -> np.ndarray:
    """Ids of the split's sequences in manifest order (shard by shard, row by row), read with
    plain tarfile."""
    ids = []
    for shard in read_manifest(shard_dir).splits[split].shards:
        with tarfile.open(shard_dir / shard.name) as tar:
            rows = np.concatenate([np.frombuffer(tar.extractfile(m).read(), "<u2")
                                   for m in tar.getmembers()]).reshape(-1, SEQ_LEN)
        ids += ids_of(rows)
    return np.array(ids)


def expected_global_batch(stored: np.ndarray, step: int, size: int = GLOBAL) -> list[int]:
    """Ids of global batch `step`: positions [step*size, (step+1)*size) of the endless order,
    position p being sequence perm_e[p % N], e = p // N, perm_e the seeded epoch shuffle."""
    n = len(stored)
    out = []
    for p in range(step * size, (step + 1) * size):
        epoch, offset = divmod(p, n)
        out.append(int(stored[np.random.default_rng([SEED, epoch]).permutation(n)[offset]]))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 7 shards x 10 = 70 sequences (an epoch is 4.375 global batches of 16);
    val: 44 sequences in ONE shard."""
    out = tmp_path_factory.mktemp("order")
    write_token_shards(out, {"train": PackedSplit(numbered(70), 70, 0)},
                       tokenizer_fingerprint=FINGERPRINT, vocab_size=VOCAB,
                       tokens_per_member=3 * SEQ_LEN, min_shards=7, shard_tokens=2**30)
    val = tmp_path_factory.mktemp("val")
    write_token_shards(val, {"train": PackedSplit(numbered(10, 1000), 10, 0),
                             "val": PackedSplit(numbered(44, 2000), 44, 0)},
                       tokenizer_fingerprint=FINGERPRINT, vocab_size=VOCAB,
                       tokens_per_member=3 * SEQ_LEN, min_shards=1, shard_tokens=2**30)
    assert len(read_manifest(out).splits["train"].shards) == 7
    assert len(read_manifest(val).splits["val"].shards) == 1
    return out, val


def loader(shard_dir, **overrides):
    settings = dict(seq_len=SEQ_LEN, micro_batch_size=2, dp_rank=0, dp_size=1,
                    global_batch_size=GLOBAL, num_workers=0, seed=SEED,
                    tokenizer_fingerprint=FINGERPRINT, micro_batches_per_message=1)
    return build_loader(shard_dir, **{**settings, **overrides})


def global_batches(streams, per_step: int, steps: int) -> list[list[int]]:
    """Per step: the ids of rank 0's per_step micro-batches, then rank 1's, ..."""
    out = []
    for _ in range(steps):
        batch = []
        for stream in streams:
            for _ in range(per_step):
                micro = next(stream)
                assert micro.shape[1] == SEQ_LEN
                batch += ids_of(micro)
        out.append(batch)
    return out


def rank_streams(shard_dir, dp_size: int, **overrides):
    loaders = [loader(shard_dir, dp_rank=r, dp_size=dp_size, **overrides) for r in range(dp_size)]
    return loaders, [iter(one) for one in loaders]


STEPS = 10  # past two epoch ends


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_union_of_ranks_is_the_global_batch(shards, dp_size, num_workers):
    train, _ = shards
    stored = stored_ids(train, "train")
    assert sorted(stored) == list(range(70))
    micro = 2
    _, streams = rank_streams(train, dp_size, num_workers=num_workers, micro_batch_size=micro)
    got = global_batches(streams, GLOBAL // (dp_size * micro), STEPS)
    assert got == [expected_global_batch(stored, s) for s in range(STEPS)]


@pytest.mark.parametrize("micro, per_message, num_workers", [(1, 1, 2), (4, 3, 2), (8, 2, 1),
                                                             (2, None, 2)])
def test_micro_batch_size_and_message_grouping_do_not_change_the_order(shards, micro,
                                                                      per_message, num_workers):
    train, _ = shards
    stored = stored_ids(train, "train")
    _, streams = rank_streams(train, 2, micro_batch_size=micro, num_workers=num_workers,
                              micro_batches_per_message=per_message)
    got = global_batches(streams, GLOBAL // (2 * micro), STEPS)
    for micro_batches in got:
        assert len(micro_batches) == GLOBAL
    assert got == [expected_global_batch(stored, s) for s in range(STEPS)]


def test_every_epoch_is_each_sequence_once_in_a_new_order(shards):
    train, _ = shards
    stream = iter(loader(train, global_batch_size=10, micro_batch_size=5))
    epochs = [[i for _ in range(14) for i in ids_of(next(stream))] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(70)) and epochs[0] != epochs[1]


def test_state_saved_at_dp2_resumes_at_dp4(shards):
    train, _ = shards
    stored = stored_ids(train, "train")
    k = 3
    loaders, streams = rank_streams(train, 2, micro_batch_size=4, num_workers=2)
    global_batches(streams, GLOBAL // (2 * 4), k)
    states = [one.state_dict() for one in loaders]
    assert states[0] == states[1] and states[0]["consumed_samples"] == k * GLOBAL
    state = json.loads(json.dumps(states[0]))
    resumed, streams = rank_streams(train, 4, micro_batch_size=1, num_workers=1)
    for one in resumed:
        one.load_state_dict(state)
    got = global_batches(streams, GLOBAL // 4, 5)
    assert got == [expected_global_batch(stored, s) for s in range(k, k + 5)]


def test_a_new_global_batch_size_continues_at_the_consumed_samples(shards):
    train, _ = shards
    stored = stored_ids(train, "train")
    original = loader(train, micro_batch_size=4)
    stream = iter(original)
    for _ in range(2 * GLOBAL // 4):  # two global batches of 16
        next(stream)
    resumed = loader(train, global_batch_size=8, micro_batch_size=4)
    resumed.load_state_dict(original.state_dict())
    got = [i for batch, _ in zip(resumed, range(6), strict=False) for i in ids_of(batch)]
    order = [i for s in range(4) for i in expected_global_batch(stored, s)]
    assert got == order[32:56]


def test_mid_step_state_resumes_only_in_its_own_layout(shards):
    train, _ = shards
    original = loader(train, micro_batch_size=2, dp_size=2, dp_rank=1)
    stream = iter(original)
    taken = [ids_of(next(stream)) for _ in range(7)]  # 4 per step: 3 into step 1
    state = original.state_dict()
    assert (state["consumed_samples"], state["step_micro_batches"]) == (GLOBAL, 3)
    same = loader(train, micro_batch_size=2, dp_size=2, dp_rank=1, num_workers=2)
    same.load_state_dict(state)
    reference = loader(train, micro_batch_size=2, dp_size=2, dp_rank=1)
    expected = [ids_of(b) for b, _ in zip(reference, range(10), strict=False)]
    assert taken == expected[:7]
    assert [ids_of(b) for b, _ in zip(same, range(3), strict=False)] == expected[7:]
    with pytest.raises(DataError, match=r"3 micro-batches into a global batch under "
                                        r"\{'global_batch_size': 16, 'dp_size': 2, "
                                        r"'micro_batch_size': 2\}.*resume with that layout"):
        loader(train, micro_batch_size=2, dp_size=4).load_state_dict(state)
    with pytest.raises(DataError, match=r"seed=5 \(now 6\)"):
        loader(train, seed=6).load_state_dict(state)


def test_one_validation_shard_serves_8_ranks_x_2_workers(shards):
    _, val = shards
    stored = stored_ids(val, "val")
    assert sorted(stored) == list(range(2000, 2044))
    dp_size, micro = 8, 2
    ranks = [loader(val, split="val", infinite=False, dp_rank=r, dp_size=dp_size,
                    global_batch_size=None, micro_batch_size=micro, num_workers=2)
             for r in range(dp_size)]
    delivered = [[ids_of(batch) for batch in rank] for rank in ranks]
    # 44 sequences = 2 batches of 8 ranks x 2, 12 left over: every rank gets 2 full micro-batches
    assert [len(rank) for rank in delivered] == [2] * dp_size == [len(r) for r in ranks]
    assert all(len(batch) == micro for rank in delivered for batch in rank)
    for step in range(2):
        union = [i for rank in delivered for i in rank[step]]
        assert union == stored[step * 16:(step + 1) * 16].tolist()
    assert [[ids_of(batch) for batch in rank] for rank in ranks] == delivered  # a second pass


def test_validation_smaller_than_one_batch_is_refused(shards):
    _, val = shards
    with pytest.raises(DataError, match=r"the val split holds 44 sequences, fewer than one batch "
                                        r"of dp_size x micro_batch_size = 48"):
        loader(val, split="val", infinite=False, dp_size=8, global_batch_size=None,
               micro_batch_size=6)
