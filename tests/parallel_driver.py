"""Train a tiny Eso-LM in every parallel layout that fits this launch's world size; write the results.

    python tests/parallel_driver.py OUT --shard-dir DIR                                # world size 1
    torchrun --standalone --nproc_per_node 2 tests/parallel_driver.py OUT --shard-dir DIR
    torchrun --standalone --nproc_per_node 4 tests/parallel_driver.py OUT --shard-dir DIR

One launch runs several short trainings (``Trainer(cfg).fit()``, 4 steps, fp32), one per layout
of LAYOUTS whose world size is this launch's, re-initialising megatron-core's groups between
layouts (the process group stays). For each layout rank 0 writes ``OUT/<layout>.json`` (the
per-step metrics) and ``OUT/<layout>.pt`` (the consolidated final parameters and EMA weights,
from esolm_dist.parallel.consolidate, in the TP=1 naming).

The references run at world size 1. A DP=d run reads other sequences than one process does
(each DP rank reads its own contiguous share of the epoch) and keys each micro-batch's noise by
its DP rank, so its reference is ``single_as_dp2``: one process, one engine, computing the
same global batch, where micro-batch k of a step is DP rank k // a's micro-batch k % a
(a = micro-batches per DP rank), with that rank's data and noise. Nothing parallel is mocked:
the reference is the plain single-process path fed the DP run's batches.
The ``*_from_single`` layouts start from the ``single`` run's final checkpoint (train.init_from)
and also write the consolidated weights they start from (``initial``).
tests/test_parallel.py launches this file and compares the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Layout:
    world_size: int
    tensor: int = 1
    pipeline: int = 1
    zero_stage: int = 0
    emulated_dp: int = 1  # world size 1 only: feed the batches of a DP=emulated_dp run
    init_from: str = ""  # train.init_from: the final checkpoint of this (earlier) layout
    recompute: bool = False  # parallel.activation_checkpointing
    model: str = "esolm"  # eso.model (the baselines: BASELINE_LAYOUTS)

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tensor * self.pipeline) * self.emulated_dp


LAYOUTS = {
    "single": Layout(1),
    "single_as_dp2": Layout(1, emulated_dp=2),
    "tp2": Layout(2, tensor=2),
    "pp2": Layout(2, pipeline=2),
    "pp2_recompute": Layout(2, pipeline=2, recompute=True),
    "dp2_zero1": Layout(2, zero_stage=1),
    "dp2_zero2": Layout(2, zero_stage=2),
    "dp2_zero3": Layout(2, zero_stage=3),
    "tp2_dp2_zero1": Layout(4, tensor=2, zero_stage=1),
    "tp2_pp2_zero1": Layout(4, tensor=2, pipeline=2, zero_stage=1),
    "single_from_single": Layout(1, init_from="single"),
    "tp2_pp2_from_single": Layout(4, tensor=2, pipeline=2, zero_stage=1, init_from="single"),
}

# The baselines (tests/test_baselines.py), one parallel layout each, run only when named in --layouts
BASELINE_LAYOUTS = {
    "ar_single": Layout(1, model="ar"),
    "ar_tp2": Layout(2, tensor=2, model="ar"),
    "mdlm_single": Layout(1, model="mdlm"),
    "mdlm_pp2": Layout(2, pipeline=2, model="mdlm"),
    "bd3lm_single": Layout(1, model="bd3lm"),
    "bd3lm_single_as_dp2": Layout(1, emulated_dp=2, model="bd3lm"),
    "bd3lm_dp2_zero2": Layout(2, zero_stage=2, model="bd3lm"),
}
ALL_LAYOUTS = {**LAYOUTS, **BASELINE_LAYOUTS}


def reference_for(name: str) -> str:
    """The world-size-1 layout that computes the same thing as ``name``."""
    layout = ALL_LAYOUTS[name]
    reference = "single" if layout.dp_size == 1 else f"single_as_dp{layout.dp_size}"
    if layout.model != "esolm":
        reference = f"{layout.model}_{reference}"
    return f"{reference}_from_{layout.init_from}" if layout.init_from else reference


STEPS = 4


def layout_config(name: str, out: Path, shard_dir: str):
    from esolm_dist.config import load_config

    layout = ALL_LAYOUTS[name]
    run_dir = out / name
    return load_config(None, [
        f"train.run_dir={run_dir}", f"data.shard_dir={shard_dir}", f"logging.mlflow_uri=sqlite:///{out}/mlflow.db",
        f"logging.run_name={name}",
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.micro_batch_size=4", "train.global_batch_size=16", f"train.max_steps={STEPS}", "train.log_every=1",
        f"train.eval_every={STEPS}", "train.eval_batches=1", f"train.save_every={STEPS}", "train.keep_last=1",
        "optim.warmup_steps=2", "optim.lr=3e-3", "optim.ema=0.9", "optim.grad_clip=1.0",
        f"parallel.tensor={layout.tensor}", f"parallel.pipeline={layout.pipeline}", f"parallel.zero_stage={layout.zero_stage}", "parallel.precision=fp32",
        "parallel.device=cpu", f"parallel.activation_checkpointing={str(layout.recompute).lower()}",
        f"eso.model={layout.model}", "eso.block_size=8",
        *([f"train.init_from={out / layout.init_from / 'checkpoints' / 'latest'}"] if layout.init_from else [])])


def emulated_dp_trainer(cfg, dp_size: int):
    """A single-process Trainer fed exactly the global batches of a DP=dp_size run (see module docstring)."""
    from esolm_dist.eso.rows import noise_generator
    from esolm_dist.train import Trainer, make_loader, rows_for

    class EmulatedDataParallel(Trainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            assert self.topo.world_size == 1 and self.accumulation % dp_size == 0
            self.per_rank = self.accumulation // dp_size
            ranks = [dataclasses.replace(self.topo, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
            self.train_loader = InterleavedLoader([make_loader(cfg, t, self.tokenizer, "train") for t in ranks],
                                                  self.per_rank)

        def micro_batch_rows(self, batches, step, loss_type):
            if step < 0:  # evaluation: not compared
                yield from super().micro_batch_rows(batches, step, loss_type)
                return
            for k, x in enumerate(batches):
                rank, micro = divmod(k, self.per_rank)
                generator = noise_generator(self.cfg.train.seed, step, micro, rank)
                yield rows_for(x, self.cfg, self.mask_id, generator, loss_type,
                               self.tokenizer.eos_id).to(self.topo.device)

    return EmulatedDataParallel(cfg)


class InterleavedLoader:
    """Per step: ``per_rank`` batches of DP rank 0's loader, then of rank 1's, ..."""

    def __init__(self, loaders, per_rank: int):
        self.loaders = loaders
        self.per_rank = per_rank

    def __iter__(self):
        streams = [iter(loader) for loader in self.loaders]
        while True:
            for stream in streams:
                for _ in range(self.per_rank):
                    yield next(stream)

    def state_dict(self) -> dict:
        """The position in the global order (every rank's loader is at the same one after a step), which
        loads under any DP size, like a real run's."""
        return self.loaders[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for loader in self.loaders:
            loader.load_state_dict(state)


def run_layout(name: str, out: Path, shard_dir: str) -> None:
    from esolm_dist.parallel.consolidate import (
        full_ema_state_dict,
        full_state_dict,
        full_state_dict_on,
        logging_rank,
    )
    from esolm_dist.train import Trainer

    layout = ALL_LAYOUTS[name]
    cfg = layout_config(name, out, shard_dir)
    trainer = emulated_dp_trainer(cfg, layout.emulated_dp) if layout.emulated_dp > 1 else Trainer(cfg)
    topo = trainer.topo
    initial = full_state_dict(trainer.engine.module, topo) if layout.init_from else None
    state = trainer.fit()
    params = full_state_dict(trainer.engine.module, topo)
    ema = full_ema_state_dict(trainer.ema, trainer.engine.module, topo)
    # text samples gather the weights to the logging rank alone: who got them, and are they these
    on_logging = full_state_dict_on(trainer.engine.module, topo, logging_rank(topo))
    gathered = (on_logging is not None, on_logging is not None and on_logging.keys() == params.keys()
                and all(torch.equal(on_logging[n], params[n]) for n in params))
    gathered_by_rank = [None] * topo.world_size
    dist.all_gather_object(gathered_by_rank, gathered)
    # every rank must hold the same full weights: compare a fingerprint of each
    fingerprint = [float(sum(t.double().sum() + t.double().square().sum() for t in d.values()))
                   for d in (params, ema)]
    fingerprints = [None] * topo.world_size
    dist.all_gather_object(fingerprints, fingerprint)
    if topo.rank == 0:
        steps = [h for h in state.history if "train/loss" in h]
        result = {"layout": name, **dataclasses.asdict(layout), "dp_size": layout.dp_size,
                  "reference": reference_for(name), "steps": [h["step"] for h in steps],
                  "loss": [h["train/loss"] for h in steps], "grad_norm": [h["train/grad_norm"] for h in steps],
                  "lr": [h["train/lr"] for h in steps],
                  "same_weights_on_all_ranks": all(f == fingerprints[0] for f in fingerprints),
                  "logging_rank": logging_rank(topo), "gathered_by_rank": gathered_by_rank,
                  "mlflow_run_id": state.mlflow_run_id}
        torch.save({"params": params, "ema": ema, "initial": initial}, out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"parallel_driver: {name}: losses {result['loss']}", flush=True)
    release(trainer)


def release(trainer) -> None:
    """Free a finished trainer's engine and megatron-core's groups, so the next layout starts clean."""
    from esolm_dist.parallel.state import reset_model_parallel

    trainer.engine.destroy()
    gc.collect()
    dist.barrier()
    reset_model_parallel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for <layout>.json and <layout>.pt")
    parser.add_argument("--shard-dir", required=True, help="token shards (built from the bundled corpus if missing)")
    parser.add_argument("--layouts", default="",
                        help="comma-separated layouts of this world size (default: every layout of LAYOUTS)")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    names = [n for n in (args.layouts.split(",") if args.layouts else LAYOUTS) if ALL_LAYOUTS[n].world_size == world_size]
    if not names:
        print(f"parallel_driver: no layout for world size {world_size}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_layout(name, args.out, args.shard_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
