"""Checkpoint bytes and per-rank memory of text samples versus the data-parallel size (quickstart model, CPU).

    python benchmarks/memory_by_dp.py [--dp 1 2 4] [--zero-stage 0] [--gather one all] [--hidden-size 128]

For each DP size, one torchrun launch (gloo, one thread per process) trains the quickstart model
(configs/quickstart.yaml, global batch 32 so DP = 4 fits) for 2 steps with an evaluation, text
samples (logging.samples = 2, at step 0 and step 2) and a save at step 2. Before every draw of
samples each rank returns freed heap memory to the OS (malloc_trim) and resets its peak RSS
(/proc/self/clear_refs); after it, it reads the peak (VmHWM):
the peak of the sample evaluation alone, and how far it rose above the RSS before it.
``--gather all`` replays the earlier behaviour (every rank consolidates the full fp32 model, the
logging rank samples) for a before/after comparison.

The checkpoint is split into model files (DeepSpeed's *model_states.pt), optimizer files
(*optim_states.pt), the EMA (the tensors of the ``ema`` entry of our rank_*.pt) and the rest
(rank_*.pt without the EMA: RNG and data-reader state; esolm.json).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parent.parent


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(run_dir: Path, zero_stage: int, gather: str, hidden: int) -> None:
    import torch.distributed as dist

    from esolm_dist.callbacks import samples
    from esolm_dist.config import load_config
    from esolm_dist.parallel import consolidate
    from esolm_dist.train import Trainer

    if gather == "all":  # the earlier behaviour: the full model on every rank, kept by the logging rank only
        def everywhere(module, topo, dst):
            weights = consolidate.full_state_dict(module, topo)
            return weights if topo.rank == dst else None

        consolidate.full_state_dict_on = everywhere
    draws = []
    original = samples.TextSamples.draw

    libc = ctypes.CDLL("libc.so.6")

    def measured(self, trainer):
        # hand freed heap pages back first (training's activations), so what the draw allocates shows in RSS
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _kib("VmRSS")
        original(self, trainer)
        draws.append({"rss_before_kib": before, "peak_kib": _kib("VmHWM")})

    samples.TextSamples.draw = measured
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), [
        f"train.run_dir={run_dir}", f"data.shard_dir={ROOT / '.cache/shards/quickstart'}", "parallel.device=cpu",
        f"parallel.zero_stage={zero_stage}", "train.global_batch_size=32", "train.max_steps=2",
        "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.log_every=1",
        "logging.samples=2", f"model.hidden_size={hidden}", f"logging.mlflow_uri=sqlite:///{run_dir}/mlflow.db", "train.resume=false"])
    trainer = Trainer(cfg)
    trainer.fit()
    per_rank = [None] * dist.get_world_size()
    ema_bytes = sum(t.numel() * t.element_size() for t in trainer.ema.shadow.values())
    dist.all_gather_object(per_rank, {"rank": dist.get_rank(), "draws": draws, "ema_bytes": ema_bytes})
    if dist.get_rank() == 0:
        (run_dir / "memory.json").write_text(json.dumps(per_rank))


def checkpoint_bytes(step_dir: Path) -> dict[str, int]:
    import torch

    split = {"model": 0, "optimizer": 0, "ema": 0, "other": 0}
    for path in step_dir.iterdir():
        size = path.stat().st_size
        if path.name.endswith("model_states.pt"):
            split["model"] += size
        elif path.name.endswith("optim_states.pt"):
            split["optimizer"] += size
        elif path.name.startswith("rank_"):
            ema = torch.load(path, weights_only=True).get("ema") or {"shadow": {}}
            ema_bytes = sum(t.numel() * t.element_size() for t in ema["shadow"].values())
            split["ema"] += ema_bytes
            split["other"] += size - ema_bytes
        else:
            split["other"] += size
    return split


def launch(dp: int, zero_stage: int, gather: str, hidden: int, scratch: Path) -> dict:
    run_dir = scratch / f"dp{dp}_{gather}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(dp),
               __file__, "--worker", str(run_dir), "--zero-stage", str(zero_stage), "--gather", gather,
               "--hidden-size", str(hidden)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"DP={dp} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    ranks = json.loads((run_dir / "memory.json").read_text())
    step_dir = run_dir / "checkpoints" / "step_00000002"
    return {"dp": dp, "gather": gather, "checkpoint": checkpoint_bytes(step_dir), "ranks": ranks}


def table(results: list[dict]) -> str:
    mib = 1024 * 1024
    lines = ["| DP | samples gathered to | model MiB | optimizer MiB | EMA MiB | other MiB | EMA MiB per rank | "
             "sample peak RSS per rank, MiB (rise above RSS before) |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        c = r["checkpoint"]
        peaks = []
        for rank in r["ranks"]:
            worst = max(rank["draws"], key=lambda d: d["peak_kib"])
            peaks.append(f"r{rank['rank']}: {worst['peak_kib'] / 1024:.0f} "
                         f"(+{(worst['peak_kib'] - worst['rss_before_kib']) / 1024:.1f})")
        per_rank = max(rank["ema_bytes"] for rank in r["ranks"]) / mib
        lines.append(f"| {r['dp']} | {'logging rank' if r['gather'] == 'one' else 'every rank'} | "
                     f"{c['model'] / mib:.2f} | {c['optimizer'] / mib:.2f} | {c['ema'] / mib:.2f} | "
                     f"{c['other'] / mib:.2f} | {per_rank:.2f} | {'; '.join(peaks)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--gather", choices=["one", "all"], nargs="+", default=["one"])
    parser.add_argument("--hidden-size", type=int, default=128, help="model.hidden_size (the quickstart's: 128)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.zero_stage, args.gather[0], args.hidden_size)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        results = [launch(dp, args.zero_stage, gather, args.hidden_size, Path(scratch)) for gather in args.gather for dp in args.dp]
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
