"""Training step speed (tokens/s, MFU) of the quickstart model on CPU: 1 process, TP=2, DP=2 ZeRO-1.

    python benchmarks/train_step.py [--steps 10 --warmup 3]

One invocation runs the single-process layout in one process and the two 2-process layouts in
one torchrun launch (megatron-core's groups are re-initialised between them). Each layout
builds the quickstart Trainer (configs/quickstart.yaml, fp32, ZeRO as named) and times full
optimizer steps (``Trainer.train_step``: global batch 16 x 128 tokens, 2 micro-batches of 8 per
process at DP=1, 1 at DP=2): median of --steps after --warmup untimed ones, each timed from a
barrier to the end of the step. The cores are split evenly between processes; one process also
runs with one thread, the baseline the 2-process layouts scale from.

tokens/s counts clean training tokens (global batch x sequence length). MFU and HFU are the
trainer's (esolm_dist.flops): model FLOPs per step (attention over the pairs the Eso-LM masks allow)
and executed FLOPs (SDPA computes every pair of each 2L row), forward + backward = 3 x forward, over
the CPU's measured fp32 GEMM rate per process x processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 1
LAYOUTS = {  # name: (processes, threads per process, overrides)
    "1 process": (1, CORES, []),
    "1 process 1 thread": (1, 1, []),
    "TP=2": (2, max(1, CORES // 2), ["parallel.tensor=2"]),
    "DP=2 ZeRO-1": (2, max(1, CORES // 2), ["parallel.zero_stage=1"]),
}


def cpu_model() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if "Model name" in line), "")
    return model or platform.processor()


def time_layout(name: str, out: Path, steps: int, warmup: int) -> None:
    """Worker side: build the quickstart Trainer for one layout and time its steps."""
    import torch
    import torch.distributed as dist

    from esolm_dist.callbacks import Throughput
    from esolm_dist.config import load_config
    from esolm_dist.flops import measured_cpu_peak
    from esolm_dist.parallel.state import reset_model_parallel
    from esolm_dist.train import Trainer

    _, threads, overrides = LAYOUTS[name]
    torch.set_num_threads(threads)
    measured_cpu_peak.cache_clear()  # the peak depends on the thread count
    run_dir = out / name.replace(" ", "_").replace(",", "").replace("=", "")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"train.run_dir={run_dir}", f"logging.mlflow_uri=sqlite:///{run_dir}/mlflow.db",
        f"data.shard_dir={ROOT / '.cache/shards/quickstart'}", "optim.ema=0", "parallel.device=cpu", *overrides])
    trainer = Trainer(cfg)
    batches = iter(trainer.train_loader)
    seconds = []
    for index in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step(batches)
        trainer.state.step += 1
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    topo = trainer.topo
    median = statistics.median(seconds)
    meter = trainer.callback(Throughput)
    if topo.rank == 0:
        tokens = cfg.train.global_batch_size * cfg.model.seq_len
        result = {"layout": name, "processes": topo.world_size, "threads_per_process": torch.get_num_threads(),
                  "step_s": seconds, "median_step_s": median, "tokens_per_s": tokens / median,
                  "flops_per_step": meter.flops_per_step, "peak_flops_per_process": meter.peak_flops,
                  "mfu": meter.flops_per_step / median / (meter.peak_flops * topo.world_size),
                  "hfu": meter.hardware_flops_per_step / median / (meter.peak_flops * topo.world_size)}
        (out / f"{run_dir.name}.json").write_text(json.dumps(result))
    trainer.engine.destroy()
    dist.barrier()
    reset_model_parallel()


def launch(processes: int, names: list[str], out: Path, args) -> None:
    worker = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--layouts", ",".join(names)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, CORES // processes)), "PYTHONWARNINGS": "ignore"}
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *worker]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark launch {names} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layouts", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        for name in args.layouts.split(","):
            time_layout(name, args.out, args.steps, args.warmup)
        return

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        by_size: dict[int, list[str]] = {}
        for name, (processes, _, _) in LAYOUTS.items():
            by_size.setdefault(processes, []).append(name)
        for processes, names in by_size.items():
            launch(processes, names, out, args)
        results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]

    import torch

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (1 min, at the "
          f"end); torch {torch.__version__}; quickstart model, fp32, global batch 16 x 128; median of "
          f"{args.steps} steps after {args.warmup}\n")
    print("| layout | processes x threads | step s (median) | step s (min-max) | tokens/s | model GFLOP/s "
          "| peak GFLOP/s (per process x processes) | MFU | HFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: list(LAYOUTS).index(r["layout"])):
        print(f"| {r['layout']} | {r['processes']} x {r['threads_per_process']} | {r['median_step_s']:.3f} | "
              f"{min(r['step_s']):.3f}-{max(r['step_s']):.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['flops_per_step'] / r['median_step_s'] / 1e9:.1f} | "
              f"{r['peak_flops_per_process'] / 1e9:.1f} x {r['processes']} | {100 * r['mfu']:.1f}% | "
              f"{100 * r['hfu']:.1f}% |")
    print(f"\nmodel FLOPs per step: {results[0]['flops_per_step'] / 1e9:.1f} G")


if __name__ == "__main__":
    main()
