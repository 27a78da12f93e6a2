"""FLOPs of a training step, counted from the attention masks, and the device peaks they are compared with.

Every matmul counts 2 FLOPs per multiply-add. Not counted (element-wise, small): embedding lookups,
LayerNorms, rotary, softmax, GELU, the loss and the optimizer.

Model FLOPs (the numerator of MFU) of one row (2L tokens; L for the AR and MDLM baselines), forward:
for each of its tokens the matmuls of the network (per layer QKV 3d^2, attention output d^2, FFN 2df; the output layer dV), plus, per
layer, 4d for every (query, key) pair the row's Eso-LM mask ALLOWS (QK^T and AV, all heads):
:func:`mask_pairs`, exact from the masks of esolm_dist.eso.masks. A packed diffusion pair and a
sequential [z0 ; x] row each allow about L^2 of their (2L)^2 pairs. A training step counts
forward + backward = 3 x forward.

Hardware FLOPs (the numerator of HFU): the same matmuls, with attention over the pairs the kernel
EXECUTES (:func:`executed_pairs`): SDPA with a dense boolean mask computes all (2L)^2; flash-attn
(two causal segments per row) and FlexAttention (block mask) skip every tile without an allowed
pair and compute each tile they touch in full, so their count is the allowed pairs rounded up to
128 x 128 tiles (a model: FlexAttention's default block size, flash-attn 2's forward tile at head
dim 64). Forward + backward = 3 x forward, plus one more forward of the transformer blocks when
activation checkpointing recomputes them in the backward pass (the output layer is not
recomputed). The recomputation of attention scores inside fused attention backward kernels is
not counted.

MFU = model FLOPs / (seconds x peak x devices), HFU = hardware FLOPs / (seconds x peak x devices),
where the peak is the device's dense rate at the precision its matmuls run in (bf16, tf32 or fp32).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass

import torch

from esolm_dist.config import ModelConfig, ParallelConfig, RunConfig
from esolm_dist.eso.baselines import training_rows
from esolm_dist.eso.masks import SEQUENTIAL, RowMaskSpec, diffusion_allowed
from esolm_dist.eso.rows import noise_generator
from esolm_dist.kernels.attention import choose_backend

TILE = 128  # sparsity granularity of flash-attn and FlexAttention (see the module docstring)

# Dense (no 2:4 sparsity) peak TFLOP/s by device name as torch reports it (e.g. "NVIDIA H100 80GB HBM3"
# for the SXM part, "NVIDIA H100 PCIe"); the first pattern that matches wins, so the specific variants
# come before the generic name.
# Sources: NVIDIA datasheets (sparse tensor figures halved): H100 SXM / PCIe / NVL and H200 /
# H200 NVL (Hopper datasheets), GH200 (its GPU is an H100 SXM-class part), A100 (A100 datasheet),
# RTX A6000 (309.7 TFLOPS sparse FP16 tensor; TF32 = half of BF16), L40S (L40S datasheet), B200
# (HGX B200 per GPU at 1000 W: BF16 4.5 PF and TF32 2.2 PF sparse, FP32 75 TFLOPS).
PEAK_TFLOPS = (
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"GH200", "GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"RTX A6000", "RTX A6000", {"bf16": 154.8, "tf32": 77.4, "fp32": 38.7}),
    (r"L40S", "L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"B200", "B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 75.0}),
)
PRECISIONS = ("bf16", "tf32", "fp32")


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training pass (forward + backward): model (MFU) and hardware (HFU)."""

    model: float
    hardware: float

    def __mul__(self, factor: float) -> StepFlops:
        return StepFlops(self.model * factor, self.hardware * factor)


def mask_pairs(masks: RowMaskSpec) -> torch.Tensor:
    """Allowed (query, key) pairs of each row [R] (int64), in closed form from esolm_dist.eso.masks.

    Every row holds two causal halves of L tokens: L(L + 1) pairs in Eso-LM (B), for both row kinds
    (diffusion pair: two causal segments; sequential [z0 ; x]: z0 query i sees itself and x_<i,
    x is causal). Eso-LM (A) adds the keys that clean tokens make visible: c(c - 1)/2 per diffusion
    segment with c clean tokens, c^2 for a sequential row (c(c + 1)/2 from z0, c(c - 1)/2 from x).
    Baselines (one row kind each): AR's causal row of L, L(L + 1)/2; MDLM's bidirectional row,
    L^2; BD3-LM's [x_t ; x] with block size L' (n = L / L' blocks): an x_t query of block b sees
    L' + b L' keys, an x query (b + 1) L', in all L'^2 n(n + 1) = L(L + L') (L' = 1: L(L + 1)).
    """
    length = masks.seq_len
    baseline = {"ar": length * (length + 1) // 2, "mdlm": length * length,
                "bd3lm": length * (length + masks.block_size)}
    if masks.model in baseline:
        return torch.full(masks.kinds.shape, baseline[masks.model], dtype=torch.int64)
    causal = torch.full(masks.kinds.shape, length * (length + 1), dtype=torch.int64)
    if masks.variant == "B":
        return causal
    clean = masks.n_clean.cpu().long()
    diffusion = (clean * (clean - 1) // 2).sum(-1)
    sequential = clean[:, 0] ** 2
    return causal + torch.where(masks.kinds.cpu() == SEQUENTIAL, sequential, diffusion)


def touched_tile_pairs(allowed: torch.Tensor, tile: int) -> int:
    """Pairs inside the tile x tile blocks of a boolean [S_q, S_k] mask that hold an allowed pair
    (blocks at the edges are clipped to the mask)."""
    rows, cols = allowed.shape
    padded = torch.zeros(-(-rows // tile) * tile, -(-cols // tile) * tile, dtype=torch.bool)
    padded[:rows, :cols] = allowed
    touched = padded.view(padded.shape[0] // tile, tile, padded.shape[1] // tile, tile).any(3).any(1)
    row_sizes = (rows - torch.arange(touched.shape[0]) * tile).clamp(max=tile)
    col_sizes = (cols - torch.arange(touched.shape[1]) * tile).clamp(max=tile)
    return int((touched.long() * row_sizes[:, None] * col_sizes[None, :]).sum())


def executed_pairs(masks: RowMaskSpec, backend: str, tile: int = TILE) -> torch.Tensor:
    """The (query, key) pairs the attention kernel computes for each row [R] (int64).

    sdpa: all (2L)^2. flash: two causal segments of L per row, rounded up to tiles (it runs only
    Eso-LM (B) diffusion rows). flex: the row's mask rounded up to tiles over the 2L row.
    """
    rows = masks.kinds.shape[0]
    if backend == "sdpa":
        return torch.full((rows,), masks.row_len**2, dtype=torch.int64)
    if backend == "flash":
        if not masks.segments_if_causal():
            raise ValueError("flash-attn runs only Eso-LM (B) diffusion rows (two causal segments)")
        index = torch.arange(masks.seq_len)
        causal = diffusion_allowed(index[:, None], index, 0, "B")
        return torch.full((rows,), 2 * touched_tile_pairs(causal, tile), dtype=torch.int64)
    if backend != "flex":
        raise ValueError(f"unknown attention backend {backend!r}")
    masks = masks.to("cpu")
    counted: dict[tuple, int] = {}
    out = torch.empty(rows, dtype=torch.int64)
    for row in range(rows):
        # only Eso-LM (A)'s masks depend on the clean counts: otherwise one count per row kind
        key = (int(masks.kinds[row]),) + (tuple(masks.n_clean[row].tolist()) if masks.depends_on_clean_counts else ())
        if key not in counted:
            one = dataclasses.replace(masks, kinds=masks.kinds[row:row + 1], n_clean=masks.n_clean[row:row + 1])
            counted[key] = touched_tile_pairs(one.dense()[0, 0], tile)
        out[row] = counted[key]
    return out


def micro_batch_flops(cfg: ModelConfig, vocab_size: int, masks: RowMaskSpec, backend: str,
                      activation_checkpointing: bool) -> StepFlops:
    """Model and hardware FLOPs of forward + backward over one micro-batch of 2L rows (module docstring).

    ``vocab_size`` is the padded vocabulary the output layer computes.
    """
    d, f, layers = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    tokens = masks.kinds.shape[0] * masks.row_len
    block_matmuls = tokens * 2 * layers * (4 * d * d + 2 * d * f)
    head = tokens * 2 * d * vocab_size
    per_pair = 4 * d * layers
    model_forward = block_matmuls + head + per_pair * int(mask_pairs(masks).sum())
    blocks_executed = block_matmuls + per_pair * int(executed_pairs(masks, backend).sum())
    recomputed = blocks_executed if activation_checkpointing else 0
    return StepFlops(3.0 * model_forward, 3.0 * (blocks_executed + head) + recomputed)


def mean_flops(flops: list[StepFlops]) -> StepFlops:
    return StepFlops(sum(f.model for f in flops) / len(flops), sum(f.hardware for f in flops) / len(flops))


def matmul_precision(pcfg: ParallelConfig) -> str:
    """The precision the matmuls run in: bf16, tf32 (fp32 with TF32 tensor cores) or fp32."""
    if pcfg.precision == "bf16":
        return "bf16"
    return "tf32" if pcfg.tf32 else "fp32"


def peak_for_name(name: str, precision: str) -> tuple[float, str]:
    """(dense peak FLOP/s, which table row) for a CUDA device name; (0, why) when it is not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks[precision] * 1e12, f"{name} = {label}, {precision} dense {peaks[precision]:g} TFLOP/s"
    return 0.0, f"{name} (not in esolm_dist.flops.PEAK_TFLOPS: MFU not reported)"


@functools.cache
def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    """The fp32 GEMM rate of this CPU (best of a few runs): the denominator of MFU on CPU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for the device that trains, at ``precision`` (bf16/tf32/fp32)."""
    if device.type == "cuda":
        return peak_for_name(torch.cuda.get_device_name(device), precision)
    return measured_cpu_peak(), "CPU (measured fp32 GEMM rate)"


def training_step_flops(cfg: RunConfig, vocab_size: int, mask_id: int, device: torch.device, dp_rank: int,
                        micro_batches: int) -> StepFlops:
    """FLOPs of one optimizer step over this rank's ``micro_batches`` micro-batches.

    The masks are those of step 0, drawn with the trainer's own noise (at most 8 micro-batches), and
    the backend is the one the model picks for them. Eso-LM (B) and baseline masks do not depend on the
    noise, so for them this is every step's exact count; for (A) it is an estimate from those draws.
    """
    e = cfg.eso
    dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
    clean = torch.full((cfg.train.micro_batch_size, cfg.model.seq_len), 1 if mask_id == 0 else 0)
    flops = []
    for micro in range(min(micro_batches, 8)):
        masks = training_rows(clean, model=e.model, alpha0=e.alpha0, kappa=e.kappa, variant=e.variant,
                              loss_type=e.loss_type, eps=e.eps, mask_id=mask_id, bos_id=0, block_size=e.block_size,
                              generator=noise_generator(cfg.train.seed, 0, micro, dp_rank)).masks
        backend = choose_backend(cfg.model.attention_backend, masks, device, dtype, needs_grad=True)
        flops.append(micro_batch_flops(cfg.model, vocab_size, masks, backend, cfg.parallel.activation_checkpointing))
    return mean_flops(flops) * micro_batches
