"""bf16 numerics with DeepSpeed as esolm-train configures it, on CPU + gloo; launched by tests/test_bf16.py.

    torchrun --standalone --nproc_per_node 2 tests/bf16_driver.py accumulation OUT --zero-stage 1

``accumulation``: one optimizer step (SGD, lr 1, no clipping) of a one-tensor model over A = 64
micro-batches per DP rank, built by esolm_dist.parallel.engine.deepspeed_config. The model's loss
is ``(w * c).sum()``, so a micro-batch's gradient is exactly its ``c``: 1 for micro-batch 0 of DP
rank 0, 2^-10 for every other. In bf16 (8 significant bits) 1 + 2^-10 rounds back to 1, so a bf16
accumulator or a bf16 DP reduction loses all the small gradients; in fp32 the step's mean gradient is
(1 + (A * DP - 1) * 2^-10) / (A * DP). Rank 0 writes the fp32 master after the step (read with
DeepSpeed's own ``safe_get_full_fp32_param``) to OUT/accumulation_zero<stage>.json.

``ema``: a tiny Eso-LM trained for a few steps (Trainer.fit, bf16 unless --fp32) with EMA 0.9. After
every step the fp32 master weights are read with DeepSpeed's helpers and an EMA is computed from them
here by hand, next to one computed from the bf16 module weights; rank 0 writes both, the trainer's
own consolidated EMA, each rank's EMA bytes and the parameter count to OUT/ema_zero<stage>.pt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

MICRO_BATCHES = 64
SMALL = 2.0 ** -10
SIZE = 8


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(SIZE))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w * c).sum()


class Scale(nn.Module):
    """Pipeline stage: x * w (w = 0 on stage 0, 1 on stage 1), so the loss sum(x * w0 * w1) gives w0 the gradient x."""

    def __init__(self, start: float):
        super().__init__()
        self.w = nn.Parameter(torch.full((SIZE,), start))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def pipeline_engine(cfg, topo, optimizer_for):
    """The same one-tensor model as two pipeline stages (DeepSpeed's PipelineModule, our rank order)."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from esolm_dist.parallel.engine import deepspeed_config

    module = PipelineModule([Scale(0.0), Scale(1.0)], loss_fn=lambda out, _: out.sum(),
                            topology=PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=topo.dp_size))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer_for(module),
                                           config=deepspeed_config(cfg, topo.dp_size, topo.device),
                                           dist_init_required=False)
    return engine


def accumulation(out: Path, zero_stage: int, pipeline: bool = False) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from esolm_dist.config import load_config
    from esolm_dist.parallel.engine import MegatronMPU, deepspeed_config, quiet_deepspeed
    from esolm_dist.parallel.state import init_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    stages = 2 if pipeline else 1
    cfg = load_config(None, ["parallel.precision=bf16", f"parallel.zero_stage={zero_stage}", "parallel.device=cpu",
                             f"parallel.pipeline={stages}", "model.num_layers=2", "train.micro_batch_size=4",
                             f"train.global_batch_size={4 * MICRO_BATCHES * world // stages}", "optim.grad_clip=0"])
    topo = init_parallel(cfg.parallel)
    quiet_deepspeed()
    if pipeline:
        engine = pipeline_engine(cfg, topo, lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
        values = (1.0 if (micro == 0 and topo.dp_rank == 0) else SMALL for micro in range(MICRO_BATCHES))
        engine.train_batch(data_iter=((torch.full((SIZE,), v, dtype=torch.bfloat16), torch.zeros(1))
                                      for v in values))
        # stage 0's weight took the step (reading its master is collective over stage 0's DP group)
        master = safe_get_full_fp32_param(engine.module.forward_funcs[0].w) if topo.pp_rank == 0 else None
        if master is not None and topo.dp_rank == 0:
            (out / f"accumulation_zero{zero_stage}_pipeline.json").write_text(json.dumps({
                "master": master.float().tolist(), "dp_size": topo.dp_size, "micro_batches": MICRO_BATCHES,
                "optimizer": type(engine.optimizer).__name__}))
        engine.destroy()
        return
    module = Linear()
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=deepspeed_config(cfg, topo.dp_size, topo.device),
                                           mpu=MegatronMPU(), dist_init_required=False)
    for micro in range(MICRO_BATCHES):
        value = 1.0 if (micro == 0 and topo.dp_rank == 0) else SMALL
        loss = engine(torch.full((SIZE,), value, dtype=torch.bfloat16))
        engine.backward(loss)
        engine.step()
    master = safe_get_full_fp32_param(engine.module.w)
    if master is None:  # no fp32 master (DeepSpeed's bf16 ZeRO-0): the module's own weights
        master = engine.module.w.detach()
    if dist.get_rank() == 0:
        (out / f"accumulation_zero{zero_stage}.json").write_text(json.dumps({
            "master": master.float().tolist(), "dp_size": topo.dp_size, "micro_batches": MICRO_BATCHES,
            "optimizer": type(engine.optimizer).__name__}))
    engine.destroy()


STEPS = 3
DECAY = 0.9


def ema(out: Path, zero_stage: int, shard_dir: str, precision: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from esolm_dist.config import load_config
    from esolm_dist.parallel.consolidate import full_ema_state_dict, full_state_dict
    from esolm_dist.train import Trainer
    from esolm_dist.weight_layout import network_parameters

    def master(module) -> dict[str, torch.Tensor]:
        """The fp32 master of every parameter, whole (collective), or the module's own fp32 weights."""
        out = {}
        for _, name, param in network_parameters(module):
            full = safe_get_full_fp32_param(param)
            out[name] = (full if full is not None else param.detach()).float().cpu().clone()
        return out

    class Recording(Trainer):
        def train_step(self, batches):
            parts = super().train_step(batches)
            for kind, weights in (("master", master(self.engine.module)), ("bf16", full_state_dict(self.engine.module, self.topo))):
                for name, value in weights.items():
                    hand[kind][name] = DECAY * hand[kind][name] + (1 - DECAY) * value
            return parts

    run_dir = out / f"ema_zero{zero_stage}_{precision}"
    cfg = load_config(None, [
        f"train.run_dir={run_dir}", f"data.shard_dir={shard_dir}", f"logging.mlflow_uri=sqlite:///{run_dir}/m.db",
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
        "train.micro_batch_size=4", "train.global_batch_size=16", f"train.max_steps={STEPS}", "train.log_every=1",
        f"train.eval_every={STEPS}", "train.eval_batches=1", f"train.save_every={STEPS}", "logging.samples=0",
        "optim.warmup_steps=1", "optim.lr=1e-2", f"optim.ema={DECAY}", "optim.grad_clip=1.0",
        f"parallel.zero_stage={zero_stage}", f"parallel.precision={precision}", "parallel.device=cpu"])
    trainer = Recording(cfg)
    start = master(trainer.engine.module)
    hand = {"master": dict(start), "bf16": full_state_dict(trainer.engine.module, trainer.topo)}
    trainer.fit()
    final_master = master(trainer.engine.module)
    got = full_ema_state_dict(trainer.ema, trainer.engine.module, trainer.topo)
    nbytes = [None] * dist.get_world_size()
    dist.all_gather_object(nbytes, trainer.ema.nbytes())
    if dist.get_rank() == 0:
        torch.save({"ema": got, "from_master": hand["master"], "from_bf16": hand["bf16"], "initial": start,
                    "final_master": final_master,
                    "ema_bytes_per_rank": nbytes, "numel": sum(t.numel() for t in start.values()),
                    "checkpoint": str(run_dir / "checkpoints" / "latest")}, out / f"ema_zero{zero_stage}.pt")
    trainer.engine.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["accumulation", "ema"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--zero-stage", type=int, required=True)
    parser.add_argument("--shard-dir", help="ema: token shards (built from the bundled corpus if missing)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--pipeline", action="store_true", help="accumulation: two pipeline stages")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "accumulation":
        accumulation(args.out, args.zero_stage, args.pipeline)
    else:
        ema(args.out, args.zero_stage, args.shard_dir, args.precision)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
