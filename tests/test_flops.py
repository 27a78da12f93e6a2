"""esolm_dist.flops: attention pairs per row kind and backend against hand counts and brute force, the FLOPs of a
micro-batch, the trainer's MFU/HFU, and the peak table looked up by real torch device names."""

import pytest
import torch
from conftest import tiny_config

from esolm_dist.config import ModelConfig, ParallelConfig
from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL, RowMaskSpec
from esolm_dist.flops import (
    executed_pairs,
    mask_pairs,
    matmul_precision,
    micro_batch_flops,
    peak_for_name,
    touched_tile_pairs,
)

P, S = DIFFUSION_PAIR, SEQUENTIAL


def spec(variant, length, kinds, n_clean):
    return RowMaskSpec(variant, length, torch.tensor(kinds), torch.tensor(n_clean))


# ---- allowed pairs (model FLOPs) --------------------------------------------------------------------

@pytest.mark.parametrize(("variant", "length", "kind", "clean", "expected"), [
    # two causal segments of 2: (0,0) (1,0) (1,1) each
    ("B", 2, P, [0, 2], 6),
    # [z0 ; x], L = 2: z0_0 sees itself; z0_1 itself and x_0; x_0 sees x_0; x_1 sees x_0, x_1
    ("B", 2, S, [1, 1], 6),
    # L = 3, first segment with 2 clean tokens: 6 causal + (q0 -> k1); second segment 6 causal
    ("A", 3, P, [2, 0], 13),
    # (A) sequential, 1 clean: as (B) plus z0_0 -> x_0
    ("A", 2, S, [1, 1], 7),
    # (A) sequential, 2 clean: z0_0 -> self, x0, x1; z0_1 -> self, x0, x1; x_0 -> x0, x1; x_1 -> x0, x1
    ("A", 2, S, [2, 2], 10),
])
def test_mask_pairs_match_hand_counts(variant, length, kind, clean, expected):
    assert mask_pairs(spec(variant, length, [kind], [clean])).tolist() == [expected]


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("length", [1, 5, 8])
def test_mask_pairs_match_brute_force_count_of_the_dense_mask(variant, length):
    gen = torch.Generator().manual_seed(length)
    clean = torch.randint(0, length + 1, (6, 2), generator=gen)
    clean[3:] = clean[3:, :1]  # sequential rows carry the same count twice
    clean[2] = torch.tensor([length, 0])  # the extremes
    masks = RowMaskSpec(variant, length, torch.tensor([P, P, P, S, S, S]), clean)
    assert torch.equal(mask_pairs(masks), masks.dense().sum(dim=(1, 2, 3)))


def test_both_row_kinds_allow_about_a_quarter_of_their_pairs_in_variant_b():
    length = 1024
    masks = spec("B", length, [P, S], [[300, 20], [256, 256]])
    assert mask_pairs(masks).tolist() == [length * (length + 1)] * 2
    assert abs(mask_pairs(masks)[0] / (2 * length) ** 2 - 0.25) < 1e-3


# ---- executed pairs (hardware FLOPs) ----------------------------------------------------------------

def test_sdpa_executes_every_pair_of_the_row():
    masks = spec("A", 6, [P, S], [[1, 2], [3, 3]])
    assert executed_pairs(masks, "sdpa").tolist() == [144, 144]


@pytest.mark.parametrize(("length", "per_segment"), [
    (256, 3 * 128 * 128),  # tiles (0,0) (1,0) (1,1)
    (200, 128 * 128 + 72 * 128 + 72 * 72),  # the second row of tiles is clipped to 72 queries / keys
])
def test_flash_executes_causal_tiles_of_each_segment(length, per_segment):
    masks = spec("B", length, [P, P], [[0, 0], [5, 9]])
    assert executed_pairs(masks, "flash").tolist() == [2 * per_segment] * 2


def test_flash_refuses_rows_it_cannot_run():
    with pytest.raises(ValueError, match="flash-attn runs only"):
        executed_pairs(spec("B", 4, [S], [[2, 2]]), "flash")


def test_flex_executes_the_touched_blocks_of_the_2l_row():
    tile = 128 * 128
    # (B) diffusion pair, L = 256: blocks (0,0) (1,0) (1,1) and (2,2) (3,2) (3,3)
    assert executed_pairs(spec("B", 256, [P], [[10, 20]]), "flex").tolist() == [6 * tile]
    # (B) sequential, L = 256: z0 diagonal (0,0) (1,1); z0 -> x (0,2) (1,2) (1,3); x causal (2,2) (3,2) (3,3)
    assert executed_pairs(spec("B", 256, [S], [[10, 10]]), "flex").tolist() == [8 * tile]


def test_flex_tiles_hand_counted_on_tiny_rows():
    # L = 4, 2 x 2 tiles: (A) first segment with 3 clean tokens also touches block (0,1) (q0 -> k2): 4 + 3 blocks
    assert executed_pairs(spec("A", 4, [P], [[3, 0]]), "flex", tile=2).tolist() == [7 * 4]
    assert executed_pairs(spec("B", 4, [P], [[3, 0]]), "flex", tile=2).tolist() == [6 * 4]
    # rows with other clean counts touch other blocks: each row is counted on its own
    assert executed_pairs(spec("A", 4, [P, P, S], [[3, 0], [0, 0], [0, 0]]), "flex", tile=2).tolist() == [28, 24, 32]
    # L = 3: blocks of 2 straddle the two segments: (0,0) (1,0) (1,1) (2,1) (2,2)
    assert executed_pairs(spec("B", 3, [P], [[0, 0]]), "flex", tile=2).tolist() == [5 * 4]


def test_touched_tiles_clip_at_the_edges():
    allowed = torch.zeros(5, 3, dtype=torch.bool)
    allowed[4, 2] = True  # only the corner tile (one query x one key) is touched
    assert touched_tile_pairs(allowed, 2) == 1


# ---- FLOPs of a micro-batch -------------------------------------------------------------------------

def test_micro_batch_flops_hand_count():
    cfg = ModelConfig(num_layers=2, hidden_size=8, num_heads=2, ffn_hidden_size=32, seq_len=4)
    masks = spec("B", 4, [P, S], [[1, 2], [3, 3]])  # 2 rows x 8 tokens
    # per token: blocks 2 x 2 layers x (4 x 64 + 2 x 8 x 32) = 3072, output layer 2 x 8 x 16 = 256
    blocks, head = 16 * 3072, 16 * 256
    # attention: 4 d x layers = 64 FLOPs per pair; allowed 2 x 20 pairs, SDPA executes 2 x 64
    model = 3 * (blocks + head + 64 * 40)
    sdpa = blocks + 64 * 128
    assert micro_batch_flops(cfg, 16, masks, "sdpa", False).model == model == 167424
    assert micro_batch_flops(cfg, 16, masks, "sdpa", False).hardware == 3 * (sdpa + head) == 184320
    # activation checkpointing recomputes the blocks' forward (not the output layer)
    assert micro_batch_flops(cfg, 16, masks, "sdpa", True).hardware == 3 * (sdpa + head) + sdpa == 241664
    assert micro_batch_flops(cfg, 16, masks, "sdpa", True).model == model


def test_block_sparse_kernels_execute_between_the_mask_and_dense():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_heads=2, seq_len=256)
    masks = spec("B", 256, [P, P], [[10, 20], [30, 40]])
    flops = {backend: micro_batch_flops(cfg, 512, masks, backend, False) for backend in ("sdpa", "flex", "flash")}
    assert flops["flash"].hardware == flops["flex"].hardware < flops["sdpa"].hardware
    assert flops["flash"].model == flops["sdpa"].model < flops["flash"].hardware  # tiles round the diagonal up


def test_trainer_reports_mfu_and_hfu_from_the_mask_counts(single_process, tmp_path, shard_dir):
    from esolm_dist.callbacks import Throughput
    from esolm_dist.train import Trainer

    trainer = Trainer(tiny_config(tmp_path / "run", shard_dir, "train.max_steps=2", "logging.samples=0",
                                  "train.eval_batches=1"))
    # tiny config: 2 layers, d = 32, FFN 128, L = 32, micro-batch 4 (one diffusion pair row + 2 sequential
    # rows of 64 tokens), 2 micro-batches per step, Eso-LM (B), SDPA on CPU
    d, vocab, rows = 32, trainer.network.vocab_size, 3
    matmuls = rows * 64 * (2 * 2 * (4 * d * d + 2 * d * 128) + 2 * d * vocab)
    per_pair = 4 * d * 2
    assert trainer.callback(Throughput).flops_per_step == 2 * 3 * (matmuls + per_pair * rows * 32 * 33)
    assert trainer.callback(Throughput).hardware_flops_per_step == 2 * 3 * (matmuls + per_pair * rows * 64 * 64)
    state = trainer.fit()
    logged = [h for h in state.history if "train/mfu" in h]
    assert logged and all(0 < h["train/mfu"] < h["train/hfu"] for h in logged)


# ---- peaks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "bf16", "tf32", "fp32"), [
    ("NVIDIA H100 80GB HBM3", 989.4, 494.7, 66.9),  # SXM
    ("NVIDIA H100 PCIe", 756.5, 378.0, 51.2),
    ("NVIDIA H100 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA H200", 989.4, 494.7, 66.9),
    ("NVIDIA H200 NVL", 835.5, 417.5, 60.0),
    ("NVIDIA GH200 480GB", 989.4, 494.7, 66.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", 312.0, 156.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 156.0, 19.5),
    ("NVIDIA RTX A6000", 154.8, 77.4, 38.7),
    ("NVIDIA L40S", 362.05, 183.0, 91.6),
    ("NVIDIA B200", 2250.0, 1100.0, 75.0),
])
def test_peak_lookup_by_torch_device_name(name, bf16, tf32, fp32):
    for precision, tflops in (("bf16", bf16), ("tf32", tf32), ("fp32", fp32)):
        peak, source = peak_for_name(name, precision)
        assert peak == pytest.approx(tflops * 1e12), (name, precision)
        assert name in source and precision in source


@pytest.mark.parametrize("name", ["NVIDIA RTX 6000 Ada Generation", "NVIDIA L40", "NVIDIA GeForce RTX 4090"])
def test_devices_outside_the_table_get_no_peak(name):
    peak, source = peak_for_name(name, "bf16")
    assert peak == 0.0 and "not in" in source


def test_matmul_precision_follows_precision_and_tf32():
    assert matmul_precision(ParallelConfig(precision="bf16", tf32=False)) == "bf16"
    assert matmul_precision(ParallelConfig(precision="fp32")) == "tf32"
    assert matmul_precision(ParallelConfig(precision="fp32", tf32=False)) == "fp32"
