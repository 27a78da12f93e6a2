"""Sampling wall time at NFE = L, batch 1 (paper section 4c): Eso-LM (B) with its unified KV
cache against the real baselines of equal width and depth, each with its own sampler
(esolm_dist.eso.sampling): AR (shift-by-one, KV cache, one token fed per step), MDLM (bidirectional,
a full forward over all L positions per step, no cache) and BD3-LM (blocks of --block-size, the
finished blocks in the KV cache, the current block's 2 x L' rows recomputed per step).

Settings, chosen to match the paper's timing: first-hitting schedule with T = 10^6 (so almost
every step decodes one token and NFE ~ L; the measured NFE is printed), no nucleus (top-p 1).
alpha0: Eso-LM 0.25 (both phases share the cache); the baselines' is fixed by their model.
The network is a random-weight quickstart-sized model (4 layers, d = 128, 4 heads, V = 4096)
unless --export names an export folder; every model has this architecture (they differ in their
inputs, masks and samplers) and speed does not depend on the weights, so one set of weights,
labelled as each model in turn, times all four. Runs are interleaved: run r of every method
before run r + 1 of any, so a change in machine load hits all alike.

    python -m benchmarks.sampling_speed [--lengths 1024 2048] [--runs 5] [--mdlm-runs 2] [--block-size 16]
                                        [--threads N] [--static-cache]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import subprocess

import torch

from esolm_dist.eso import METHODS
from esolm_dist.eso.sampling import sample
from esolm_dist.inference.export_io import ExportConfig
from esolm_dist.inference.model import EsoLM

NUM_STEPS = 10**6
ALPHA0 = {"eso": 0.25, "ar": 0.0, "mdlm": 1.0, "bd3lm": 1.0}
LABELS = {"eso": "Eso-LM (B), cached", "ar": "AR, cached", "mdlm": "MDLM, no cache", "bd3lm": "BD3-LM, block-cached"}


def quickstart_model(max_seq_len: int, device: str) -> EsoLM:
    config = ExportConfig.from_dict({
        "format": "esolm-export-v1", "vocab_size": 4096, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
        "ffn_hidden_size": 512, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1,
        "eos_token_id": 0, "max_seq_len": max_seq_len, "variant": "B", "alpha0": 0.25, "dtype": "float32",
    }, "benchmark config")
    torch.manual_seed(0)
    return EsoLM(config).to(device).eval()


def as_model_of(model: EsoLM, method: str, block_size: int = 16) -> EsoLM:
    """The same network (shared weights) labelled as the model ``method`` samples (config.json "model"):
    each sampler runs only on its own model; speed does not depend on what the weights learnt."""
    labelled = copy.copy(model)
    labelled.config = dataclasses.replace(model.config, model=METHODS[method], block_size=block_size)
    return labelled


def time_one_sample(model: EsoLM, method: str, length: int, seed: int, device: str,
                    block_size: int = 16) -> tuple[float, int]:
    """Wall time and NFE of one sample."""
    generator = torch.Generator(device=device).manual_seed(seed)
    result = sample(as_model_of(model, method, block_size), 1, length, method=method, alpha0=ALPHA0[method],
                    num_steps=NUM_STEPS, top_p=1.0, generator=generator, device=device)
    return result.wall_time_s, result.nfe


def time_interleaved(model: EsoLM, length: int, runs: dict[str, int], device: str,
                     block_size: int) -> dict[str, list]:
    """Per method, [(seconds, NFE)] of runs[method] samples; run r of every method is taken
    before run r + 1 of any, so a change in machine load hits all methods alike."""
    timings = {method: [] for method in runs}
    for seed in range(max(runs.values())):
        for method, count in runs.items():
            if seed < count:
                timings[method].append(time_one_sample(model, method, length, seed, device, block_size))
    return timings


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    return f"{model}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", default=None, help="time this export folder instead of random weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 1024 2048, plus 8192 on cuda)")
    parser.add_argument("--runs", type=int, default=5, help="runs per cached method and length (median)")
    parser.add_argument("--mdlm-runs", type=int, default=2, help="runs of MDLM per length (slow: L full passes)")
    parser.add_argument("--block-size", type=int, default=16, help="BD3-LM's block size L' (divides every length)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--static-cache", action="store_true",
                        help="cached samplers on StaticKVCache (CUDA graphs on a GPU) instead of KVCache")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or ([1024, 2048, 8192] if args.device == "cuda" else [1024, 2048])
    if args.export:
        model = EsoLM.from_pretrained(args.export, device=args.device)
        if max(lengths) > model.config.max_seq_len:
            parser.error(f"--lengths exceed max_seq_len {model.config.max_seq_len} of {args.export}/config.json")
    else:
        model = quickstart_model(max(lengths), args.device)
    model.static_kv_cache = args.static_cache
    if any(length % args.block_size for length in [64, *lengths]):
        parser.error(f"--block-size {args.block_size} must divide 64 and every --lengths value")
    for method in ALPHA0:  # warm-up: allocator, kernels, thread pool
        time_one_sample(model, method, 64, 0, args.device, args.block_size)

    cache = "StaticKVCache" if args.static_cache else "KVCache"
    print(f"machine: {machine_name(args.device)}; torch {torch.__version__}; T = {NUM_STEPS}, top-p 1, batch 1, {cache}, "
          f"BD3-LM block {args.block_size}")
    print(f"{'L':>6}  {'method':<20} {'alpha0':>6} {'NFE':>11} {'runs':>4} {'median s':>9} {'min s':>8} {'max s':>8}")
    medians = {}
    for length in lengths:
        runs = {"eso": args.runs, "ar": args.runs, "mdlm": args.mdlm_runs, "bd3lm": args.runs}
        for method, timings in time_interleaved(model, length, runs, args.device, args.block_size).items():
            times, nfes = [t for t, _ in timings], [n for _, n in timings]
            medians[length, method] = statistics.median(times)
            nfe = "-".join(map(str, sorted({min(nfes), max(nfes)})))
            print(f"{length:>6}  {LABELS[method]:<20} {ALPHA0[method]:>6} {nfe:>11} {runs[method]:>4} "
                  f"{medians[length, method]:>9.2f} {min(times):>8.2f} {max(times):>8.2f}", flush=True)
    print("\nratios of medians")
    for length in lengths:
        eso = medians[length, "eso"]
        print(f"L = {length}: MDLM / Eso-LM = {medians[length, 'mdlm'] / eso:.1f}x, BD3-LM / Eso-LM = "
              f"{medians[length, 'bd3lm'] / eso:.2f}x, Eso-LM / AR = {eso / medians[length, 'ar']:.2f}x")


if __name__ == "__main__":
    main()
