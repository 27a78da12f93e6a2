"""``esolm-train CONFIG [section.key=value ...]``: train an Eso-LM on one process or many.

    esolm-train                                   # the quickstart: tiny model, CPU, bundled corpus
    torchrun --nproc_per_node 4 -m esolm_dist.train configs/quickstart.yaml parallel.tensor=2

The loop reads as a list of steps; parallelism lives in esolm_dist.parallel, noise in
esolm_dist.eso.rows, checkpoints in esolm_dist.checkpoint, logging in esolm_dist.monitor.
"""

from __future__ import annotations

import argparse
import itertools
import math
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from esolm_dist import checkpoint
from esolm_dist.config import ConfigError, RunConfig, describe_keys, load_config, to_dict
from esolm_dist.data.errors import DataError
from esolm_dist.ema import EMA
from esolm_dist.eso.loss import loss_parts
from esolm_dist.eso.rows import build_rows, noise_generator
from esolm_dist.flops import device_peak_flops, matmul_precision, training_step_flops
from esolm_dist.inference.export_io import ExportError
from esolm_dist.meter import StepMeter, clock, count
from esolm_dist.parallel.state import Topology, check_layout, decided_on_rank0, init_parallel, launch_env
from esolm_dist.provenance import run_tags
from esolm_dist.run_lock import RunLock, RunLockError
from esolm_dist.signals import StopRequest

BUNDLED = "bundled"


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    run_uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # which checkpoints are this run's
    mlflow_run_id: str | None = None
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


def rows_for(x: torch.Tensor, cfg: RunConfig, mask_id: int, generator: torch.Generator, loss_type: str):
    e = cfg.eso
    return build_rows(x, alpha0=e.alpha0, kappa=e.kappa, variant=e.variant, loss_type=loss_type, eps=e.eps,
                      mask_id=mask_id, generator=generator)


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
        self.stop = StopRequest(self.topo.device)  # early: a signal during start-up stops at the first step
        say(self.topo, "esolm-train: resolved config\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
        checkpoint.ensure_writable(cfg.train.run_dir)
        self.run_lock = RunLock(cfg.train.run_dir)
        for note in decided_on_rank0(self.topo, self._claim_run_dir):
            say(self.topo, f"esolm-train: {note}")
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
        cfg = self.cfg
        self.tokenizer = prepare_data(cfg, self.topo)
        self.mask_id = self.tokenizer.mask_id
        self.engine, self.network = self._build_engine()
        self.ema = EMA(self.engine.module, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.train_loader = make_loader(cfg, self.topo, self.tokenizer, "train")
        self.state = TrainState()
        self.accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.topo.dp_size)
        flops = training_step_flops(cfg, self.network.vocab_size, self.mask_id, self.topo.device, self.topo.dp_rank,
                                    self.accumulation) * self.topo.dp_size  # esolm_dist.flops: MFU and HFU
        self.flops_per_step, self.hardware_flops_per_step = flops.model, flops.hardware
        self.peak_flops, self.peak_source = device_peak_flops(self.topo.device, matmul_precision(cfg.parallel))
        self.monitor = None

    def _build_engine(self):
        from esolm_dist.model.objective import EsoObjective
        from esolm_dist.model.transformer import EsoTransformer
        from esolm_dist.parallel.engine import build_engine
        from esolm_dist.parallel.pipeline import build_pipeline

        cfg, topo = self.cfg, self.topo
        dtype = torch.bfloat16 if cfg.parallel.precision == "bf16" else torch.float32
        if topo.pp_size > 1:
            network = build_pipeline(cfg.model, self.tokenizer.vocab_size, self.mask_id, dtype, cfg.train.seed,
                                     cfg.eso.variant, topo.tp_size, topo.pp_size, topo.dp_size,
                                     cfg.parallel.activation_checkpointing)
            module = network.to(topo.device)
        else:
            network = EsoTransformer(cfg.model, self.tokenizer.vocab_size, self.mask_id, dtype,
                                     init_seed=cfg.train.seed)
            network.checkpoint_activations = cfg.parallel.activation_checkpointing
            module = EsoObjective(network, cfg.eso.variant, cfg.model.seq_len).to(topo.device)
        if cfg.train.init_from and self._checkpoint_to_resume() is None:
            self._load_initial_weights(module)
        engine = build_engine(module, cfg, topo.dp_size)
        torch.manual_seed(cfg.train.seed + 7919 * self.topo.dp_rank)  # dropout differs across replicas
        return engine, network

    def _checkpoint_to_resume(self) -> Path | None:
        return checkpoint.find_latest(self.cfg.train.run_dir) if self.cfg.train.resume else None

    def _load_initial_weights(self, module) -> None:
        from esolm_dist.parallel.warm_start import load_source_weights, read_source_weights

        source = read_source_weights(self.cfg.train.init_from)
        load_source_weights(module, source, self.cfg.model.num_layers, self.tokenizer.vocab_size, self.mask_id)
        say(self.topo, f"esolm-train: weights from the {source.description}; step, optimizer and data start afresh")

    # ---- checkpoints ------------------------------------------------------------------------------
    def resume(self) -> None:
        latest = self._checkpoint_to_resume()
        if latest is None:
            return
        meta, rank_state = checkpoint.load(self.engine, latest, self.topo, to_dict(self.cfg)["model"])
        self.state.step = meta["step"]
        self.state.consumed_samples = meta["consumed_samples"]
        self.state.run_uid = meta.get("run_uid") or self.state.run_uid
        self.state.mlflow_run_id = meta.get("mlflow_run_id")
        self.state.last_val_nelbo = meta.get("val_nelbo")
        self.state.best_val_nelbo = meta.get("best_val_nelbo")
        checkpoint.set_rng_state(rank_state["rng"])
        self.train_loader.load_state_dict(rank_state["data"])
        if self.ema is not None and rank_state.get("ema") is not None:
            self.ema.load_state_dict(rank_state["ema"])
        say(self.topo, f"esolm-train: resumed from {latest} at step {self.state.step}")

    def save(self) -> Path:
        meta = {"consumed_samples": self.state.consumed_samples, "run_uid": self.state.run_uid,
                "mlflow_run_id": self.state.mlflow_run_id,
                "val_nelbo": self.state.last_val_nelbo, "best_val_nelbo": self.state.best_val_nelbo,
                "config": to_dict(self.cfg), "tokenizer_vocab": self.tokenizer.vocab_size, "mask_id": self.mask_id}
        rank_state = {"rng": checkpoint.rng_state(), "data": self.train_loader.state_dict(),
                      "ema": self.ema.state_dict() if self.ema is not None else None}
        path = checkpoint.save(self.engine, self.cfg.train.run_dir, self.state.step, meta, rank_state, self.topo,
                               self.cfg.train.keep_last)
        say(self.topo, f"esolm-train: saved {path}")
        return path

    # ---- steps ------------------------------------------------------------------------------------
    def micro_batch_rows(self, batches, step: int, loss_type: str):
        """The rows of each micro-batch; noise keyed by (seed, step, micro-batch, DP rank)."""
        cfg, topo = self.cfg, self.topo
        for micro, x in enumerate(batches):
            generator = noise_generator(cfg.train.seed, step, micro, topo.dp_rank)
            yield rows_for(x, cfg, self.mask_id, generator, loss_type).to(topo.device)

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``accumulation`` micro-batches; returns DP-averaged metrics."""
        cfg, topo = self.cfg, self.topo
        step_batches = (next(batches) for _ in range(self.accumulation))
        rows = self.micro_batch_rows(step_batches, self.state.step, cfg.eso.loss_type)
        if topo.pp_size > 1:
            from esolm_dist.parallel.pipeline import pipeline_inputs

            # only the first and last stage draw micro-batches (and so advance their readers)
            self.engine.train_batch(data_iter=(pipeline_inputs(r) for r in rows))
            sums = self._pipeline_loss_parts()
        else:
            sums = torch.zeros(3, device=topo.device)
            for micro_rows in rows:
                out = self.engine(*_row_tensors(micro_rows))
                self.engine.backward(out["loss"])
                self.engine.step()
                sums += loss_parts(out)
            sums /= self.accumulation
        if self.ema is not None:
            self.ema.update(self.engine.module)
        means = dp_mean(sums).tolist()
        return {"loss": means[0], "loss_diffusion": means[1], "loss_sequential": means[2],
                "grad_norm": self.engine.grad_norm(), "lr": self.engine.get_lr()[0]}

    def _pipeline_loss_parts(self) -> torch.Tensor:
        """(loss, diffusion, sequential) means of the micro-batches just run, from the last stage
        (which computed them) to every stage."""
        from megatron.core import parallel_state as ps

        parts = self.engine.module.loss_fn.take()
        parts = parts if parts is not None else torch.zeros(3, device=self.topo.device)
        dist.broadcast(parts, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return parts

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation NELBO per token and its two halves (ELBO weights, fixed noise: comparable across
        evaluations)."""
        cfg, topo = self.cfg, self.topo
        val = list(itertools.islice(make_loader(cfg, topo, self.tokenizer, "val"), cfg.train.eval_batches))
        if not val:
            raise ConfigError(f"the validation split in {cfg.data.shard_dir} is empty; raise data.val_fraction")
        rows = self.micro_batch_rows(val, -1, "elbo")
        self.engine.eval()
        if topo.pp_size > 1:
            from esolm_dist.parallel.pipeline import pipeline_inputs

            # DeepSpeed averages the loss over micro-batches and DP and broadcasts it to every stage
            nelbo = float(self.engine.eval_batch(data_iter=(pipeline_inputs(r) for r in rows),
                                                 num_micro_batches=len(val)))
            halves = dp_mean(self._pipeline_loss_parts()).tolist()[1:]
        else:
            sums = torch.zeros(3, device=topo.device)
            for r in rows:
                out = self.engine(*_row_tensors(r))
                sums += loss_parts(out)
            means = dp_mean(sums / len(val)).tolist()
            nelbo, halves = means[0], means[1:]
        self.engine.train()
        return {"nelbo": nelbo, "loss_diffusion": halves[0], "loss_sequential": halves[1]}

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train to max_steps or a stop signal. However it ends, the run folder's lock is released; an
        error marks the MLflow run FAILED before it propagates."""
        try:
            return self._loop()
        except BaseException:
            if self.monitor is not None:
                self.monitor.close("FAILED")
            raise
        finally:
            self.run_lock.release()

    def _loop(self) -> TrainState:
        cfg, topo, state = self.cfg, self.topo, self.state
        self.resume()
        self._open_monitor()
        batches = iter(self.train_loader)
        samples_per_step = cfg.train.global_batch_size
        meter = StepMeter(state.step, cfg.train.max_steps)
        saved_at = state.step
        if state.step == 0:  # the baseline every later evaluation is compared with
            self._evaluate_and_record()
            meter.resume()  # training time starts now
        while state.step < cfg.train.max_steps:
            metrics = self.train_step(batches)
            state.step += 1
            state.consumed_samples += samples_per_step
            meter.count_step()
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {state.step}; lower optim.lr or "
                                         f"check the data in {cfg.data.shard_dir}")
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                self._log_step(metrics, *meter.take_window(), meter)
            stopping = self.stop.agreed()
            evaluating = state.step % cfg.train.eval_every == 0 or state.step == cfg.train.max_steps
            saving = state.step % cfg.train.save_every == 0 or state.step == cfg.train.max_steps or stopping
            if evaluating or saving:
                meter.pause()  # tokens/s and MFU count training time only
                if evaluating:
                    self._evaluate_and_record()
                if saving:
                    self.save()
                    saved_at = state.step
                meter.resume()
            if stopping:
                say(topo, f"esolm-train: stop signal received; saved step {saved_at} and exiting")
                break
        meter.take_window()
        finished = state.step >= cfg.train.max_steps
        self._summarise(meter, saved_at, finished)
        if self.monitor is not None:
            self.monitor.close("FINISHED" if finished else "KILLED")
            self.monitor = None
        return state

    def _open_monitor(self) -> None:
        """The MLflow run on the logging rank (a new one, or the checkpoint's, continued); its id to all ranks."""
        cfg, topo, state = self.cfg, self.topo, self.state
        hosts = [None] * topo.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        if topo.is_logging_rank:
            from esolm_dist.monitor import MlflowMonitor

            config_file = Path(cfg.train.run_dir) / "config.yaml"
            config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            tags = run_tags(checkpoint.layout_of(topo), hosts)
            self.monitor = MlflowMonitor(cfg, state.mlflow_run_id, config_file, tags)
            if self.monitor.notice:
                print(f"esolm-train: {self.monitor.notice}", flush=True)
            state.mlflow_run_id = self.monitor.run_id
        run_ids = [state.mlflow_run_id]
        dist.broadcast_object_list(run_ids, src=_logging_rank(topo))
        state.mlflow_run_id = run_ids[0]
        say(topo, f"esolm-train: MLflow run {state.mlflow_run_id} at "
                  f"{self.monitor.uri if self.monitor else cfg.logging.mlflow_uri}; "
                  f"MFU peak: {self.peak_source}")

    def _log_step(self, metrics: dict[str, float], steps: int, seconds: float, meter: StepMeter) -> None:
        """One console line and one MLflow record per log step (the only host syncs of the loop)."""
        cfg, topo, state = self.cfg, self.topo, self.state
        metrics.update(self._rates(steps, seconds))
        metrics["step_time_s"] = seconds / steps
        metrics["tokens_seen"] = state.consumed_samples * cfg.model.seq_len
        memory = ""
        if topo.device.type == "cuda":
            metrics["memory_gb"] = torch.cuda.max_memory_allocated(topo.device) / 2**30
            memory = f" | mem {metrics['memory_gb']:.1f} GiB"
            torch.cuda.reset_peak_memory_stats(topo.device)
        self._record("train", metrics)
        eta = meter.eta(state.step)
        mfu = f" mfu {100 * metrics['mfu']:.1f}% hfu {100 * metrics['hfu']:.1f}%" if "mfu" in metrics else ""
        say(topo, f"step {state.step:>6}/{cfg.train.max_steps} loss {metrics['loss']:.4f} "
                  f"(mdm {metrics['loss_diffusion']:.4f} ar {metrics['loss_sequential']:.4f}) lr {metrics['lr']:.2e} "
                  f"gnorm {metrics['grad_norm']:.3f} | {metrics['tokens_per_s']:.0f} tok/s{mfu} "
                  f"{metrics['step_time_s']:.2f} s/step | elapsed {clock(meter.elapsed())} ETA "
                  f"{clock(eta) if eta is not None else '-'} | tokens {count(metrics['tokens_seen'])}{memory} | "
                  f"attention={self.attention_backend()}", from_logging_rank=True)

    def _rates(self, steps: int, seconds: float) -> dict[str, float]:
        """tokens/s, and MFU and HFU where the device's peak is known, of ``steps`` trained in ``seconds``."""
        rates = {"tokens_per_s": steps * self.cfg.train.global_batch_size * self.cfg.model.seq_len / seconds}
        if self.peak_flops:
            per_flop_s = steps / seconds / (self.peak_flops * self.topo.world_size)
            rates["mfu"], rates["hfu"] = self.flops_per_step * per_flop_s, self.hardware_flops_per_step * per_flop_s
        return rates

    def _summarise(self, meter: StepMeter, saved_at: int, finished: bool) -> None:
        """The end-of-run summary: console and MLflow (summary/...)."""
        cfg, topo, state = self.cfg, self.topo, self.state
        tokens = meter.total_steps * cfg.train.global_batch_size * cfg.model.seq_len
        summary = {"steps": meter.total_steps, "seconds": meter.elapsed(), "tokens": tokens,
                   **(self._rates(meter.total_steps, meter.total_seconds) if meter.total_seconds else
                      {"tokens_per_s": 0.0})}
        for key in ("last_val_nelbo", "best_val_nelbo"):
            if getattr(state, key) is not None:
                summary[key] = getattr(state, key)
        if self.monitor is not None:
            self.monitor.log_summary(summary, state.step)
        val = (f"validation NELBO/token final {state.last_val_nelbo:.4f}, best {state.best_val_nelbo:.4f}; "
               if state.last_val_nelbo is not None else "")
        mfu = f", MFU {100 * summary['mfu']:.1f}%, HFU {100 * summary['hfu']:.1f}%" if "mfu" in summary else ""
        say(topo, f"esolm-train: {'finished' if finished else 'stopped'} at step {state.step}: {val}"
                  f"{meter.total_steps} steps, {count(tokens)} tokens in {clock(summary['seconds'])} "
                  f"({summary['tokens_per_s']:.0f} tok/s{mfu}); checkpoint "
                  f"{checkpoint.checkpoint_root(cfg.train.run_dir) / checkpoint.tag_for(saved_at)}; "
                  f"MLflow run {state.mlflow_run_id} ({cfg.logging.mlflow_uri}; `mlflow ui --backend-store-uri "
                  f"{cfg.logging.mlflow_uri}`)")

    def attention_backend(self) -> str:
        """The kernel the last forward pass used (on this rank's stage)."""
        plans = getattr(self.network, "plans", None)
        return plans.backend if plans is not None else self.network.last_backend

    @staticmethod
    def last_run_id_of(run_dir: str | Path) -> str | None:
        """The MLflow run id recorded in a run directory's latest checkpoint (None before the first save)."""
        latest = checkpoint.find_latest(run_dir)
        return checkpoint.read_meta(latest).get("mlflow_run_id") if latest else None

    def _evaluate_and_record(self) -> None:
        val = self.evaluate()
        state = self.state
        state.last_val_nelbo = val["nelbo"]
        state.best_val_nelbo = min(val["nelbo"], state.best_val_nelbo if state.best_val_nelbo is not None else math.inf)
        self._record("val", {**val, "ppl_bound": math.exp(min(val["nelbo"], 50.0))})
        say(self.topo, f"step {state.step:>6} validation NELBO/token {val['nelbo']:.4f} (mdm "
                       f"{val['loss_diffusion']:.4f} ar {val['loss_sequential']:.4f})", from_logging_rank=True)
        if self.cfg.logging.samples:
            self._log_samples()

    def _log_samples(self) -> None:
        """Consolidate the weights (collective) and log text samples from the logging rank."""
        from esolm_dist.parallel.consolidate import full_state_dict
        from esolm_dist.preview import preview_samples

        weights = full_state_dict(self.engine.module, self.topo)
        if self.monitor is None:
            return
        texts = preview_samples(weights, self.cfg, self.tokenizer, self.mask_id, self.cfg.logging.samples,
                                self.cfg.train.seed, self.topo.device)
        self.monitor.log_samples(texts, self.state.step)

    def _record(self, group: str, metrics: dict[str, float]) -> None:
        """Metrics named ``group/key`` (train/..., val/...), in the history and in MLflow."""
        named = {f"{group}/{key}": value for key, value in metrics.items()}
        self.state.history.append({"step": self.state.step, **named})
        if self.monitor is not None:
            self.monitor.log(named, self.state.step)


def _row_tensors(rows):
    from esolm_dist.model.objective import row_tensors

    return row_tensors(rows)


def _logging_rank(topo: Topology) -> int:
    """Global rank of DP 0 / TP 0 on the last pipeline stage (megatron's order: TP fastest, then DP, then PP)."""
    return topo.tp_size * topo.dp_size * (topo.pp_size - 1)


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
