"""Milliseconds per cached sampling step at batch 1: the per-step cost behind
benchmarks/sampling_speed.py, for each KV-cache layout of the exported model, and optionally for
an older checkout of this repository.

One sample = Eso-LM (B) at L tokens, alpha0 0.25, T = 10^6 (nearly every step decodes one token,
so each step feeds two: the token decoded last step and the next mask), top-p 1, on the
random-weight quickstart-sized model of sampling_speed.py; ms/step = decoding-loop time / NFE.
Layouts: KVCache (the default), StaticKVCache (``model.static_kv_cache = True``: attention over
the whole capacity with a mask; on CUDA its steps replay CUDA graphs). ``--checkouts DIR ...``
also times each DIR's own code with its default layout (any checkout of this repository that has
benchmarks/sampling_speed.py, e.g. ``git worktree add DIR COMMIT``; ``.`` for this one), in a
fresh subprocess per sample, so that old and new code are timed alike. Run r of every source
comes before run r + 1 of any, so a change in machine load hits all alike.

    python -m benchmarks.sampling_step [--length 1024] [--runs 5] [--checkouts OLD .] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys

import torch

from benchmarks.sampling_speed import machine_name, quickstart_model, time_one_sample

# One timed sample with the code of the current directory (also run by older checkouts).
ONE_SAMPLE = """
import sys, torch
from benchmarks.sampling_speed import quickstart_model, time_one_sample
length, seed, device, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
model = quickstart_model(length, device)
time_one_sample(model, "eso", 64, 0, device)  # warm-up
seconds, nfe = time_one_sample(model, "eso", length, seed, device)
print(1e3 * seconds / nfe)
"""


def checkout_ms(directory: str, length: int, seed: int, *, device: str, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=directory)
    out = subprocess.run([sys.executable, "-c", ONE_SAMPLE, str(length), str(seed), device, str(threads)],
                         cwd=directory, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def layout_ms(model, static: bool, length: int, seed: int, *, device: str) -> float:
    model.static_kv_cache = static
    seconds, nfe = time_one_sample(model, "eso", length, seed, device)
    return 1e3 * seconds / nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024, help="tokens per sample (L)")
    parser.add_argument("--runs", type=int, default=5, help="samples per source (median)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--checkouts", nargs="*", default=[], help="checkouts to time in subprocesses")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = quickstart_model(args.length, args.device)
    for static in (False, True):  # warm-up: allocator, kernels, graph capture of the step shapes
        layout_ms(model, static, 64, 0, device=args.device)
    sources = {"in process: KVCache": functools.partial(layout_ms, model, False, args.length, device=args.device),
               "in process: StaticKVCache": functools.partial(layout_ms, model, True, args.length, device=args.device)}
    for directory in args.checkouts:
        sources[f"checkout {directory}"] = functools.partial(checkout_ms, os.path.abspath(directory), args.length,
                                                             device=args.device, threads=args.threads)
    timings = {name: [] for name in sources}
    for seed in range(args.runs):
        for name, measure in sources.items():
            timings[name].append(measure(seed))
    print(f"machine: {machine_name(args.device)}; torch {torch.__version__}; Eso-LM (B), L = {args.length}, "
          f"alpha0 0.25, T = 10^6, top-p 1, batch 1; {args.runs} samples each")
    for name, values in timings.items():
        print(f"{name:<50} median {statistics.median(values):.3f} ms/step   "
              f"(runs: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
