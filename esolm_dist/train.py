"""``esolm-train CONFIG [section.key=value ...]``: train an Eso-LM on one process or many.

    esolm-train                                   # the quickstart: tiny model, CPU, bundled corpus
    torchrun --nproc_per_node 4 -m esolm_dist.train configs/quickstart.yaml parallel.tensor=2

The Trainer builds the run (data, the one model with its parallelism applied from outside by
esolm_dist.parallel.engine, EMA) and runs the loop of optimizer steps; checkpoints, evaluation, text
samples, MLflow, throughput and stop signals hang off the loop as callbacks (esolm_dist.callbacks).
Noise lives in esolm_dist.eso.rows, checkpoint files in esolm_dist.checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from esolm_dist import checkpoint
from esolm_dist.callbacks import Callback, default_callbacks
from esolm_dist.config import ConfigError, RunConfig, describe_keys, load_config, to_dict
from esolm_dist.data.errors import DataError
from esolm_dist.ema import EMA
from esolm_dist.eso.baselines import training_rows
from esolm_dist.eso.rows import noise_generator
from esolm_dist.inference.export_io import ExportError
from esolm_dist.meter import StepMeter
from esolm_dist.parallel.state import Topology, check_layout, decided_on_rank0, init_parallel, launch_env
from esolm_dist.reshard import load_resharded
from esolm_dist.run_lock import RunLock, RunLockError
from esolm_dist.signals import StopRequest

BUNDLED = "bundled"


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    run_uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # which checkpoints are this run's
    mlflow_run_id: str | None = None
    saved_at: int = 0  # the step of this run's newest checkpoint
    last_val_nelbo: float | None = None
    best_val_nelbo: float | None = None
    history: list[dict] = field(default_factory=list)  # per logged step: the metrics (returned to callers)


def say(topo: Topology, message: str, from_logging_rank: bool = False) -> None:
    """Print once: from global rank 0, or from the rank that holds the loss (last pipeline stage)."""
    if (topo.is_logging_rank if from_logging_rank else topo.rank == 0):
        print(message, flush=True)


def prepare_data(cfg: RunConfig, topo: Topology):
    """Load the tokenizer; build the shards from the corpus on rank 0 when they are missing."""
    from esolm_dist.data.shards import ensure_shards
    from esolm_dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None if cfg.data.tokenizer == BUNDLED else cfg.data.tokenizer)
    if topo.rank == 0 and cfg.data.corpus:
        from esolm_dist.data.corpus import BUNDLED_CORPUS

        paths = [BUNDLED_CORPUS if name == BUNDLED else Path(name) for name in cfg.data.corpus]
        ensure_shards(paths, tokenizer.path, cfg.model.seq_len, cfg.data.shard_dir, cfg.data.val_fraction)
    dist.barrier()
    return tokenizer


def make_loader(cfg: RunConfig, topo: Topology, tokenizer, split: str):
    from esolm_dist.data.loader import build_loader

    return build_loader(cfg.data.shard_dir, split=split, seq_len=cfg.model.seq_len,
                        micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp_size,
                        global_batch_size=cfg.train.global_batch_size if split == "train" else None,
                        num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                        tokenizer_fingerprint=tokenizer.fingerprint, skip_corrupt=cfg.data.skip_corrupt,
                        infinite=(split == "train"))


def rows_for(x: torch.Tensor, cfg: RunConfig, mask_id: int, generator: torch.Generator, loss_type: str,
             bos_id: int):
    """The model input of a micro-batch for eso.model (bos_id: the AR baseline's first input, the EOS id)."""
    e = cfg.eso
    return training_rows(x, model=e.model, alpha0=e.alpha0, kappa=e.kappa, variant=e.variant, loss_type=loss_type,
                         eps=e.eps, mask_id=mask_id, bos_id=bos_id, block_size=e.block_size, generator=generator)


def dp_mean(values: torch.Tensor) -> torch.Tensor:
    """Average over the data-parallel group (every replica holds the same model)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= ps.get_data_parallel_world_size()
    return values


def check_launch(cfg: RunConfig) -> None:
    """Layout errors that stop a run at start-up, before any process group is formed (one line each)."""
    from esolm_dist.parallel.engine import check_batch_layout

    check_batch_layout(cfg, check_layout(cfg.parallel, launch_env()["world_size"]))


class Trainer:
    """Builds everything once; ``fit()`` runs the loop until max_steps or a stop signal."""

    def __init__(self, cfg: RunConfig):
        check_launch(cfg)
        self.cfg = cfg
        self.topo = init_parallel(cfg.parallel)
        self.stop_request = StopRequest()  # early: a signal during start-up stops at the first step
        self.say("esolm-train: resolved config\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        checkpoint.ensure_writable(cfg.train.run_dir)
        self.run_lock = RunLock(cfg.train.run_dir)
        for note in decided_on_rank0(self.topo, self._claim_run_dir):
            self.say(f"esolm-train: {note}")
        try:
            self._build()
        except BaseException:
            self.run_lock.release()
            raise

    def _claim_run_dir(self) -> list[str]:
        """Rank 0: lock the run folder; with resume=false, refuse to mix a new run into old checkpoints
        unless train.overwrite moves them aside. Returns what to tell the user."""
        run_dir = self.cfg.train.run_dir
        notes = [note] if (note := self.run_lock.acquire()) else []
        if not self.cfg.train.resume and checkpoint.has_checkpoints(run_dir):
            if not self.cfg.train.overwrite:
                self.run_lock.release()
                raise checkpoint.CheckpointError(
                    f"{checkpoint.checkpoint_root(run_dir)} holds checkpoints and train.resume=false would start a new "
                    "run among them; set train.resume=true to continue it, train.overwrite=true to move them aside "
                    "and start over, or use another train.run_dir")
            notes.append(f"train.overwrite: moved the old checkpoints to {checkpoint.set_aside(run_dir)}")
        return notes

    def _build(self) -> None:
        from esolm_dist.model.objective import EsoObjective
        from esolm_dist.model.transformer import EsoTransformer
        from esolm_dist.parallel.engine import build_engine

        cfg, topo = self.cfg, self.topo
        self.tokenizer = prepare_data(cfg, topo)
        self.mask_id = self.tokenizer.mask_id
        dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
        self.network = EsoTransformer(cfg.model, self.tokenizer.vocab_size, self.mask_id, dtype,
                                      init_seed=cfg.train.seed)
        if cfg.train.init_from and self.checkpoint_to_resume() is None:
            self._load_initial_weights()
        objective = EsoObjective(self.network, cfg.eso.variant, cfg.model.seq_len, cfg.eso.model, cfg.eso.block_size)
        self.engine = build_engine(objective, cfg, topo)
        torch.manual_seed(cfg.train.seed + 7919 * topo.dp_rank)  # dropout differs across replicas
        self.ema = EMA(self.engine.module, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.train_loader = make_loader(cfg, topo, self.tokenizer, "train")
        self.state = TrainState()
        self.accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * topo.dp_size)
        self.callbacks: list[Callback] = default_callbacks(self)
        self.meter: StepMeter | None = None
        self.summary: dict[str, float] = {}  # the session's totals, filled at the end
        self.stopping = False  # set by the stop callback: save and end after this step

    def _load_initial_weights(self) -> None:
        from esolm_dist.warm_start import load_source_weights, read_source_weights

        source = read_source_weights(self.cfg.train.init_from, self.cfg.train.run_dir)
        load_source_weights(self.network, source, self.cfg.model.num_layers, self.tokenizer.vocab_size, self.mask_id)
        self.say(f"esolm-train: weights from the {source.description}; step, optimizer and data start afresh")

    # ---- services for the callbacks ---------------------------------------------------------------
    def say(self, message: str, from_logging_rank: bool = False) -> None:
        say(self.topo, message, from_logging_rank)

    def due(self, every: int) -> bool:
        """Whether the step just taken is one of every ``every`` steps (the last step always is)."""
        return self.state.step % every == 0 or self.state.step == self.cfg.train.max_steps

    def evaluation_due(self) -> bool:
        return self.due(self.cfg.train.eval_every)

    def record(self, group: str, metrics: dict[str, float]) -> None:
        """Metrics named ``group/key`` (train/..., val/...): into the history, then to the callbacks."""
        named = {f"{group}/{key}": value for key, value in metrics.items()}
        self.state.history.append({"step": self.state.step, **named})
        self.notify("on_metrics", named)

    def notify(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def callback(self, kind: type) -> Callback:
        """The trainer's callback of type ``kind``."""
        return next(c for c in self.callbacks if isinstance(c, kind))

    def checkpoint_to_resume(self) -> Path | None:
        return checkpoint.find_latest(self.cfg.train.run_dir) if self.cfg.train.resume else None

    @staticmethod
    def last_run_id_of(run_dir: str | Path) -> str | None:
        """The MLflow run id recorded in a run directory's latest checkpoint (None before the first save)."""
        latest = checkpoint.find_latest(run_dir)
        return checkpoint.read_meta(latest).get("mlflow_run_id") if latest else None

    # ---- steps ------------------------------------------------------------------------------------
    def micro_batch_rows(self, batches, step: int, loss_type: str):
        """The rows of each micro-batch; noise keyed by (seed, step, micro-batch, DP rank)."""
        cfg, topo = self.cfg, self.topo
        for micro, x in enumerate(batches):
            generator = noise_generator(cfg.train.seed, step, micro, topo.dp_rank)
            yield rows_for(x, cfg, self.mask_id, generator, loss_type, self.tokenizer.eos_id).to(topo.device)

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over ``accumulation`` micro-batches; returns this rank's mean (loss,
        diffusion half, sequential half), still on the device (reading it is a host sync)."""
        step_batches = (next(batches) for _ in range(self.accumulation))
        parts = self.engine.train_step(self.micro_batch_rows(step_batches, self.state.step, self.cfg.eso.loss_type),
                                       self.accumulation)
        if self.ema is not None:
            self.ema.update(self.engine.module)
        return parts

    def step_metrics(self, parts: torch.Tensor) -> dict[str, float]:
        """The DP-averaged losses of a step (collective), its gradient norm and learning rate."""
        means = dp_mean(parts.clone()).tolist()
        return {"loss": means[0], "loss_diffusion": means[1], "loss_sequential": means[2],
                "grad_norm": self.engine.grad_norm(), "lr": self.engine.lr()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation NELBO per token and its two halves (ELBO weights, fixed noise: comparable across
        evaluations)."""
        cfg, topo = self.cfg, self.topo
        val = list(itertools.islice(make_loader(cfg, topo, self.tokenizer, "val"), cfg.train.eval_batches))
        if not val:
            raise ConfigError(f"the validation split in {cfg.data.shard_dir} is empty; raise data.val_fraction")
        means = dp_mean(self.engine.eval_step(self.micro_batch_rows(val, -1, "elbo"), len(val))).tolist()
        return {"nelbo": means[0], "loss_diffusion": means[1], "loss_sequential": means[2]}

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train to max_steps or a stop signal. However it ends, the run folder's lock is released; on an
        error the callbacks hear of it (MLflow marks the run FAILED) before it propagates."""
        try:
            return self._loop()
        except BaseException:
            self.notify("on_failure")
            raise
        finally:
            self.stop_request.stop_listening()
            self.run_lock.release()

    def _loop(self) -> TrainState:
        cfg, state = self.cfg, self.state
        self.resume()
        self.meter = StepMeter(state.step, cfg.train.max_steps)
        self.meter.pause()
        self.notify("on_train_start")
        self.meter.resume()  # training time starts now
        batches = iter(self.train_loader)
        while state.step < cfg.train.max_steps and not self.stopping:
            parts = self.train_step(batches)
            state.step += 1
            state.consumed_samples += cfg.train.global_batch_size
            self.meter.count_step()
            metrics = None
            if self.due(cfg.train.log_every) or self.due(cfg.train.save_every):
                metrics = self.step_metrics(parts)
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {state.step}; lower optim.lr or "
                                             f"check the data in {cfg.data.shard_dir}")
            self.notify("on_step_end", metrics)
            self.meter.pause()  # tokens/s and MFU count training time only
            self.notify("on_step_boundary")
            self.meter.resume()
        # the summary: what the run reached; the callbacks add their totals (throughput) before it is logged
        self.summary = {key: value for key in ("last_val_nelbo", "best_val_nelbo")
                        if (value := getattr(state, key)) is not None}
        self.notify("on_train_end", state.step >= cfg.train.max_steps)
        return state

    def resume(self) -> None:
        """Continue from the run's latest checkpoint (train.resume): weights, optimizer, schedule, step,
        data position, RNG and EMA."""
        latest = self.checkpoint_to_resume()
        if latest is None:
            return
        state, topo = self.state, self.topo
        meta = checkpoint.read_meta(latest)
        checkpoint.check_fits(meta, latest, to_dict(self.cfg)["model"])
        change = checkpoint.layout_change(meta, topo, self.cfg.parallel.zero_stage)
        if change is None:
            rank_state = checkpoint.load(self.engine.deepspeed, latest, topo)
        else:
            rank_state = load_resharded(self.engine.deepspeed, self.ema, latest, meta, topo)
            self.say(f"esolm-train: resuming step {meta['step']} {change}: weights, optimizer state"
                     f"{' and EMA' if self.ema is not None else ''} resharded")
        state.step = state.saved_at = meta["step"]
        state.consumed_samples = meta["consumed_samples"]
        state.run_uid = meta.get("run_uid") or state.run_uid
        state.mlflow_run_id = meta.get("mlflow_run_id")
        state.last_val_nelbo = meta.get("val_nelbo")
        state.best_val_nelbo = meta.get("best_val_nelbo")
        if rank_state["rng"] is None:  # another layout: see esolm_dist.reshard
            checkpoint.reseed(self.cfg.train.seed, state.step, topo.dp_rank)
        else:
            checkpoint.set_rng_state(rank_state["rng"])
        self.train_loader.load_state_dict(rank_state["data"])
        if self.ema is not None and rank_state.get("ema") is not None:
            self.ema.load_state_dict(rank_state["ema"])
        self.say(f"esolm-train: resumed from {latest} at step {state.step}")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        prog="esolm-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an Eso-LM. With no CONFIG, trains the quickstart model on CPU on the bundled corpus.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=100 parallel.tensor=2 eso.alpha0=0.125\n\n"
               "Config keys (key=default (type; allowed values)); defaults are the quickstart's:\n" + describe_keys())
    parser.add_argument("config", nargs="?", help="YAML run config (configs/*.yaml); default: the quickstart")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides applied after the file")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        Trainer(cfg).fit()
    except (ConfigError, checkpoint.CheckpointError, DataError, ExportError, RunLockError, FloatingPointError) as exc:
        print(f"esolm-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
