"""Save in one parallel layout, resume in another; write what each run saw.

    python tests/resume_layouts_driver.py OUT --shard-dir DIR --phase first        # world size 1
    torchrun --standalone --nproc_per_node 2 tests/resume_layouts_driver.py OUT --shard-dir DIR
    torchrun --standalone --nproc_per_node 4 tests/resume_layouts_driver.py OUT --shard-dir DIR
    python tests/resume_layouts_driver.py OUT --shard-dir DIR --phase last         # world size 1

Every run of RUNS whose world size (and phase) is this launch's trains a tiny Eso-LM (fp32, EMA on)
in its layout: a source to step 2 (its checkpoint is the one resumed), a resume from a copy of an
earlier run's folder to step 4. Rank 0 writes ``OUT/<run>.json`` (per-step losses, the LR, step and
Adam step right after the resume) and ``OUT/<run>.pt``: the consolidated weights and EMA weights at
the end, and, right after the resume (or at the end of a source run), the consolidated weights, EMA,
fp32 master weights and Adam moments, read off the live engine with esolm_dist.parallel.consolidate
and DeepSpeed's own safe_get_full_* API (independently of esolm_dist.reshard, which put them there).

The references run at world size 1 and compute what the resumed layouts compute: steps 1-2 with the
source's global batches and noise, steps 3-4 with the target's (single_as_dp<d> as in
tests/parallel_driver.py). The data reader's position is one place in the global order
(esolm_dist.data.plan), so every resumed run, at any DP size, continues the saved data stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from parallel_driver import emulated_dp_trainer, release  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Run:
    world_size: int
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    emulated_dp: int = 1  # world size 1 only: feed the batches of a DP=emulated_dp run
    resume_from: str = ""  # resume a copy of this earlier run's folder (to step 4); else a source (to step 2)
    phase: str = "first"  # world-size-1 runs: "last" ones resume checkpoints of the parallel launches


RUNS = {
    # sources (steps 1-2)
    "single": Run(1),
    "ref_dp2": Run(1, emulated_dp=2),
    "dp2_zero2": Run(2, zero_stage=2),
    "pp2": Run(2, pipeline=2),
    "tp2_pp2_zero1": Run(4, tensor=2, pipeline=2, zero_stage=1),
    # references (world size 1, same layout: DeepSpeed's own resume)
    "ref_dp2_then_single": Run(1, resume_from="ref_dp2"),
    "ref_single_then_dp4": Run(1, emulated_dp=4, resume_from="single"),
    "ref_single_then_single": Run(1, resume_from="single"),
    "ref_single_then_dp2": Run(1, emulated_dp=2, resume_from="single"),
    # the four layout changes
    "tp2_from_dp2_zero2": Run(2, tensor=2, resume_from="dp2_zero2"),
    "dp4_zero1_from_tp2_pp2_zero1": Run(4, zero_stage=1, resume_from="tp2_pp2_zero1"),
    "single_from_pp2": Run(1, resume_from="pp2", phase="last"),
    "dp2_zero3_from_single": Run(2, zero_stage=3, resume_from="single"),
    # and into a pipeline (DP=1 on both sides: the data stream continues)
    "tp2_pp2_zero1_from_single": Run(4, tensor=2, pipeline=2, zero_stage=1, resume_from="single"),
}
CASES = {  # resumed run: its reference (the source's reference is the resumed reference's source)
    "tp2_from_dp2_zero2": "ref_dp2_then_single",
    "dp4_zero1_from_tp2_pp2_zero1": "ref_single_then_dp4",
    "single_from_pp2": "ref_single_then_single",
    "dp2_zero3_from_single": "ref_single_then_dp2",
    "tp2_pp2_zero1_from_single": "ref_single_then_single",
}
SOURCE_STEPS, RESUMED_STEPS = 2, 4


def run_config(name: str, out: Path, shard_dir: str):
    from esolm_dist.config import load_config

    run = RUNS[name]
    return load_config(None, [
        f"train.run_dir={out / name}", f"data.shard_dir={shard_dir}", f"logging.mlflow_uri=sqlite:///{out}/mlflow.db",
        f"logging.run_name={name}", "logging.samples=0",
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.micro_batch_size=4", "train.global_batch_size=16", "train.log_every=1", "train.eval_batches=1",
        f"train.max_steps={RESUMED_STEPS if run.resume_from else SOURCE_STEPS}", f"train.eval_every={RESUMED_STEPS}",
        f"train.save_every={SOURCE_STEPS}", "train.keep_last=2", f"train.resume={str(bool(run.resume_from)).lower()}",
        "optim.warmup_steps=4", "optim.lr=3e-3", "optim.ema=0.9", "optim.grad_clip=1.0",
        f"parallel.tensor={run.tensor}", f"parallel.pipeline={run.pipeline}", f"parallel.zero_stage={run.zero_stage}",
        "parallel.precision=fp32", "parallel.device=cpu"])


def full_optimizer_state(engine, topo) -> dict[str, dict[str, torch.Tensor]]:
    """Master weights and Adam moments, whole, in network names, on every rank (collective): DeepSpeed's
    safe_get_full_* under ZeRO (and its bf16 optimizer), torch's state otherwise."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from esolm_dist.parallel.consolidate import _gather_stages, gather_tensor_parallel
    from esolm_dist.weight_layout import network_parameters

    ds = engine.deepspeed
    base = getattr(ds.optimizer, "optimizer", ds.optimizer)
    out = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for _, name, param in network_parameters(ds.module):
        if hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer"):
            values = {"master": safe_get_full_fp32_param(param),
                      **{k: safe_get_full_optimizer_state(param, k) for k in ("exp_avg", "exp_avg_sq")}}
        else:
            values = {"master": param.detach(), **{k: base.state[param][k] for k in ("exp_avg", "exp_avg_sq")}}
        for kind, value in values.items():
            out[kind][name] = gather_tensor_parallel(value.detach().float().clone(), param).cpu()
    return {kind: _gather_stages(tensors, topo) for kind, tensors in out.items()}


def snapshot(trainer) -> tuple[dict, dict]:
    """(numbers, tensors) of the live run: collective."""
    from esolm_dist.parallel.consolidate import full_ema_state_dict, full_state_dict

    topo, engine = trainer.topo, trainer.engine
    base = getattr(engine.deepspeed.optimizer, "optimizer", engine.deepspeed.optimizer)
    adam_steps = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    everyone = [None] * topo.world_size
    dist.all_gather_object(everyone, adam_steps)
    numbers = {"step": trainer.state.step, "lr": engine.lr(), "adam_steps": sorted({s for r in everyone for s in r}),
               "global_steps": engine.deepspeed.global_steps}
    tensors = {"params": full_state_dict(engine.module, topo), "ema": full_ema_state_dict(trainer.ema, engine.module,
                                                                                            topo),
               **full_optimizer_state(engine, topo)}
    return numbers, tensors


def record_resume(trainer) -> dict:
    """Make the trainer's resume also take a snapshot right after it (returned dict, filled then)."""
    resumed = {}
    resume = trainer.resume

    def resume_and_record():
        resume()
        resumed["numbers"], resumed["tensors"] = snapshot(trainer)

    trainer.resume = resume_and_record
    return resumed


def run_one(name: str, out: Path, shard_dir: str) -> None:
    from esolm_dist.train import Trainer

    run = RUNS[name]
    if run.resume_from and int(os.environ.get("RANK", "0")) == 0:
        shutil.copytree(out / run.resume_from, out / name)
    if dist.is_initialized():
        dist.barrier()
    cfg = run_config(name, out, shard_dir)
    trainer = emulated_dp_trainer(cfg, run.emulated_dp) if run.emulated_dp > 1 else Trainer(cfg)
    resumed = record_resume(trainer) if run.resume_from else {}
    state = trainer.fit()
    numbers, tensors = snapshot(trainer)
    if trainer.topo.rank == 0:
        steps = [h for h in state.history if "train/loss" in h]
        result = {"run": name, **dataclasses.asdict(run), "steps": [h["step"] for h in steps],
                  "loss": [h["train/loss"] for h in steps], "grad_norm": [h["train/grad_norm"] for h in steps],
                  "lr": [h["train/lr"] for h in steps], "end": numbers, "resumed": resumed.get("numbers")}
        torch.save({"end": tensors, "resumed": resumed.get("tensors")}, out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"resume_layouts_driver: {name}: steps {result['steps']} losses {result['loss']}", flush=True)
    release(trainer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for <run>.json, <run>.pt and the runs' folders")
    parser.add_argument("--shard-dir", required=True, help="token shards (built from the bundled corpus if missing)")
    parser.add_argument("--phase", default="first", choices=("first", "last"), help="world size 1: which runs")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    names = [n for n, r in RUNS.items() if r.world_size == world_size and (world_size > 1 or r.phase == args.phase)]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_one(name, args.out, args.shard_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
