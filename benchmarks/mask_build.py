"""FlexAttention block-mask building per training step: torch's ``create_block_mask`` over the
Eso-LM ``mask_mod`` (the old path: it evaluates the mask on all R x 2L x 2L pairs) against
``esolm_dist.kernels.flex_masks.flex_block_mask`` (tiles from per-query key ranges; Eso-LM (B)'s
cached per shape), on the micro-batches of the quickstart (L = 128) and small (L = 1024) configs.

Every step draws a new micro-batch (new noise, new clean counts), as training does; the two
builders alternate step by step, so a change in machine load hits both alike. For (B) the first
step of the new builder fills its cache: it is reported apart from the median of the others.

    python -m benchmarks.mask_build [--steps 7] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.sampling_speed import machine_name
from esolm_dist.eso.rows import build_rows
from esolm_dist.kernels.flex_masks import flex_block_mask, reference_block_mask

# (name, L, micro-batch): configs/quickstart.yaml and configs/small.yaml, kappa 0.5, alpha0 0.25
SHAPES = (("quickstart", 128, 8), ("small", 1024, 16))
MASK_ID = 0


def old_builder(masks, device):
    return reference_block_mask(masks)


def new_builder(masks, device):
    return flex_block_mask(masks, device)


def timed(build, masks, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    build(masks, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7, help="micro-batches per shape and variant")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine_name(args.device)}; torch {torch.__version__}; {args.steps} steps each")
    print(f"{'config':<11} {'L':>5} {'rows':>4} {'variant':>7}  {'old ms (median)':>15}  {'new ms (median)':>15}  "
          f"{'new first ms':>12}  {'old / new':>9}")
    generator = torch.Generator().manual_seed(0)
    for name, length, batch in SHAPES:
        for variant in ("A", "B"):
            old, new = [], []
            for _ in range(args.steps):
                x = torch.randint(1, 4096, (batch, length), generator=generator)
                masks = build_rows(x, alpha0=0.25, kappa=0.5, variant=variant, loss_type="elbo", eps=1e-3,
                                   mask_id=MASK_ID, generator=generator).masks.to(device)
                old.append(timed(old_builder, masks, device))
                new.append(timed(new_builder, masks, device))
            old_ms, new_ms = 1e3 * statistics.median(old), 1e3 * statistics.median(new[1:] if variant == "B" else new)
            print(f"{name:<11} {length:>5} {len(masks.kinds):>4} {variant:>7}  {old_ms:>15.2f}  {new_ms:>15.3f}  "
                  f"{1e3 * new[0]:>12.2f}  {old_ms / new_ms:>8.0f}x", flush=True)


if __name__ == "__main__":
    main()
