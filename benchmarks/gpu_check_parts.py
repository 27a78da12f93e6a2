"""The four parts of benchmarks/gpu_check.py and what they measure with (see that file's docstring).

Each part is ``part(box, sizes, ctx) -> dict`` with its ``cases`` run through ``box.run``; it knows
nothing of the runner and the report.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.gpu_check import Sizes, TimeBox

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls in full fp32 (no TF32) inside the block, whatever parallel.tf32 set."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, call, repeats: int) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs, the device synchronised around each."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@dataclass
class Context:
    device: object  # torch.device
    scratch: Path  # removed at the end of the run


# ---- attention --------------------------------------------------------------------------------------

def dense_reference(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) over the allowed keys) v in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def row_masks(shape: dict, variant: str, kind: int, generator):
    import torch

    from esolm_dist.eso.masks import SEQUENTIAL, RowMaskSpec

    rows, length = shape["rows"], shape["seq_len"]
    clean = torch.randint(0, length + 1, (rows, 2), generator=generator)
    if kind == SEQUENTIAL:
        clean[:, 1] = clean[:, 0]
    return RowMaskSpec(variant, length, torch.full((rows,), kind), clean)


def attention_part(box: TimeBox, sizes: Sizes, ctx: Context) -> dict:
    import torch

    from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL

    shape, device = sizes.attention, ctx.device
    gen = torch.Generator().manual_seed(0)
    masks = {f"{variant} {label}": row_masks(shape, variant, kind, gen)
             for variant in ("B", "A") for kind, label in ((DIFFUSION_PAIR, "diffusion pairs"),
                                                           (SEQUENTIAL, "sequential [z0 ; x]"))}
    cases = [{"backend": backend, "mask": mask, "dtype": dtype}
             for dtype in ("bf16", "fp32") for mask in [*masks, "sampling chunk after cache"]
             for backend in ("flash", "flex", "sdpa")]
    records = []
    with exact_fp32():
        for record in box.run(cases, lambda case: attention_case(case, masks, shape, device)):
            records.extend(record.pop("passes", [record]))  # one record per pass (forward, backward)
    return {"shape": shape, "tolerance": "largest error relative to max |reference|: bf16 5e-2, fp32 5e-3 "
                                         "(fp32 without TF32)",
            "timing": "median of `repeats` calls; backward: one forward + backward per call; first_call_s "
                      "includes compilation", "cases": records}


def attention_case(case: dict, masks: dict, shape: dict, device) -> dict:
    """Forward and backward of one backend on one mask kind in one dtype, against the dense fp32 reference.

    Where the backend can train, the forward pass also runs on inputs that require gradients (as in
    training, and one FlexAttention compilation then serves both passes)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[case["dtype"]]
    gen = torch.Generator().manual_seed(1)
    heads, dim = shape["heads"], shape["head_dim"]
    if case["mask"] == "sampling chunk after cache":
        query_shape, key_len, allowed, calls = chunk_after_cache(case["backend"], shape, device, dtype)
    else:
        spec = masks[case["mask"]]
        query_shape, key_len = (shape["rows"], heads, spec.row_len, dim), spec.row_len
        allowed = spec.dense(device)
        calls = planned_calls(case["backend"], spec, device, dtype)
    q = torch.randn(query_shape, generator=gen).to(device, dtype)
    k, v = (torch.randn(query_shape[:2] + (key_len, dim), generator=gen).to(device, dtype) for _ in range(2))
    grad_out = torch.randn(query_shape, generator=gen).to(device, dtype)
    trains = not isinstance(calls["backward"], str)
    inputs = [t.detach().requires_grad_(trains) for t in (q, k, v)]
    reference = [t.detach().float().requires_grad_(trains) for t in (q, k, v)]
    expected = dense_reference(*reference, allowed)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 5e-3
    passes = []
    for name, call in calls.items():
        if isinstance(call, str):
            passes.append({**case, "pass": name, "status": "skipped", "reason": call})
            continue
        if name == "forward":
            start = time.perf_counter()
            out = call(*inputs)
            synchronize(device)
            first_call = time.perf_counter() - start
            absolute, relative = errors([(out, expected)])
            seconds = timed(device, lambda call=call: call(*inputs), shape["repeats"])
        else:
            start = time.perf_counter()
            out.backward(grad_out)
            synchronize(device)
            first_call = time.perf_counter() - start
            expected.backward(grad_out.float())
            absolute, relative = errors([(t.grad, r.grad) for t, r in zip(inputs, reference, strict=True)])
            seconds = timed(device, lambda call=call: call(*inputs).backward(grad_out), shape["repeats"])
        status = "ok" if relative <= tolerance else "failed"
        passes.append({**case, "pass": name, "status": status, "max_abs_error": absolute, "relative_error": relative,
                       "time_per_call_ms": 1e3 * seconds, "first_call_s": first_call,
                       **({} if status == "ok" else {"reason": f"relative error {relative:.2e} > {tolerance:g}"})})
    return {"passes": passes}


def errors(pairs) -> tuple[float, float]:
    """(largest |got - want|, largest |got - want| / max |want|) over (got, want) tensor pairs."""
    differences = [((got.detach().float() - want.detach()).abs().max(), want.detach().abs().max()) for got, want in pairs]
    return max(float(d) for d, _ in differences), max(float(d / scale) for d, scale in differences)


def planned_calls(backend: str, spec, device, dtype) -> dict:
    """{pass: the project's attention plan for this backend, or the reason it cannot run}."""
    from esolm_dist.kernels.attention import plan_attention

    try:
        plan = plan_attention(spec, device, dtype, backend, needs_grad=True)
        return {"forward": plan, "backward": plan}
    except ValueError as exc:
        cannot_train = str(exc)
    try:
        return {"forward": plan_attention(spec, device, dtype, backend, needs_grad=False), "backward": cannot_train}
    except ValueError as exc:
        return {"forward": str(exc), "backward": cannot_train}


def chunk_after_cache(backend: str, shape: dict, device, dtype):
    """Sampling attention: 2 queries over ``cached`` keys plus themselves (causal in the chunk)."""
    import torch

    from esolm_dist.kernels.attention import attend_after_cache, choose_cached_backend

    chunk, cached = 2, shape["cached"]
    query_shape = (1, shape["heads"], chunk, shape["head_dim"])
    allowed = torch.ones(chunk, cached + chunk, dtype=torch.bool, device=device).tril(cached)
    probe = torch.empty(query_shape, device=device, dtype=dtype)
    if backend == "flex":
        reason = "the cached sampling path has no FlexAttention kernel (attend_after_cache: flash-attn or SDPA)"
    elif backend == "flash" and choose_cached_backend(probe, None) != "flash":
        reason = "flash-attn runs the cached chunk only on CUDA in bf16/fp16 with flash-attn installed"
    else:
        reason = None
    call = reason or (lambda q, k, v: attend_after_cache(q, k, v, None, backend))
    return query_shape, cached + chunk, allowed, {"forward": call, "backward": call}


# ---- training ---------------------------------------------------------------------------------------

def run_config(ctx: Context, config_file: str, overrides, name: str):
    from esolm_dist.config import load_config

    run_dir = ctx.scratch / name
    base = [f"train.run_dir={run_dir}", f"data.shard_dir={run_dir}/shards", "data.corpus=[]",
            "data.tokenizer=bundled", f"parallel.device={ctx.device.type}", "parallel.precision=bf16",
            "parallel.zero_stage=1", "optim.ema=0"]
    cfg = load_config(ROOT / "configs" / config_file, [*base, *overrides])
    cfg.train.global_batch_size = cfg.train.micro_batch_size  # one micro-batch per optimizer step
    return cfg


def build_training(cfg, vocab: int, mask_id: int, device):
    """The trainer's path for one process: EsoTransformer -> EsoObjective -> DeepSpeed engine."""
    import torch

    from esolm_dist.model.objective import EsoObjective
    from esolm_dist.model.transformer import EsoTransformer
    from esolm_dist.parallel.engine import build_engine
    from esolm_dist.parallel.state import Topology

    network = EsoTransformer(cfg.model, vocab, mask_id, torch.bfloat16, init_seed=cfg.train.seed)
    objective = EsoObjective(network, cfg.eso.variant, cfg.model.seq_len)
    return build_engine(objective, cfg, Topology.single_process(device)), network


def train_step(engine, cfg, mask_id: int, step: int, device):
    """One optimizer step on random tokens with the trainer's noise; returns the loss (a device tensor)."""
    import torch

    from esolm_dist.eso.rows import build_rows, noise_generator
    e = cfg.eso
    gen = torch.Generator().manual_seed(step)
    x = torch.randint(0, mask_id, (cfg.train.micro_batch_size, cfg.model.seq_len), generator=gen)
    rows = build_rows(x, alpha0=e.alpha0, kappa=e.kappa, variant=e.variant, loss_type=e.loss_type, eps=e.eps,
                      mask_id=mask_id, generator=noise_generator(cfg.train.seed, step, 0, 0)).to(device)
    return engine.train_step([rows], micro_batches=1)[0]


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def training_part(box: TimeBox, sizes: Sizes, ctx: Context) -> dict:
    from esolm_dist.config import ParallelConfig
    from esolm_dist.parallel.state import init_parallel

    init_parallel(ParallelConfig(device=ctx.device.type))
    cases = [{"model": label, "config": config_file, "activation_checkpointing": ckpt}
             for label, config_file, _, _ in sizes.training for ckpt in (False, True)]
    settings = {label: (overrides, vocab) for label, _, overrides, vocab in sizes.training}
    records = box.run(cases, lambda case: training_case(case, *settings[case["model"]], sizes, ctx))
    memory = "torch.cuda.max_memory_allocated" if ctx.device.type == "cuda" else "process peak RSS so far"
    return {"memory": memory, "steps": f"{sizes.warmup_steps} untimed + {sizes.timed_steps} timed",
            "tokens": "clean tokens (micro-batch x L) per second, as the trainer counts", "cases": records}


def training_case(case: dict, overrides, vocab: int, sizes: Sizes, ctx: Context) -> dict:
    import torch

    from esolm_dist.flops import device_peak_flops, matmul_precision, training_step_flops

    device = ctx.device
    ckpt = f"parallel.activation_checkpointing={str(case['activation_checkpointing']).lower()}"
    cfg = run_config(ctx, case["config"], [*overrides, ckpt], "train")
    mask_id = vocab - 1
    engine, network = build_training(cfg, vocab, mask_id, device)
    try:
        for step in range(sizes.warmup_steps):
            train_step(engine, cfg, mask_id, step, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        losses = [train_step(engine, cfg, mask_id, sizes.warmup_steps + i, device)
                  for i in range(sizes.timed_steps)]
        synchronize(device)
        step_s = (time.perf_counter() - start) / sizes.timed_steps
        loss = float(losses[-1])
    finally:
        engine.destroy()
    flops = training_step_flops(cfg, network.vocab_size, mask_id, device, 0, 1)
    peak, source = device_peak_flops(device, matmul_precision(cfg.parallel))
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss}")
    m = cfg.model
    return {"status": "ok", "layers": m.num_layers, "hidden": m.hidden_size, "seq_len": m.seq_len,
            "micro_batch": cfg.train.micro_batch_size, "vocab": network.vocab_size,
            "attention_backend": network.last_backend, "step_time_s": step_s,
            "tokens_per_s": cfg.train.micro_batch_size * m.seq_len / step_s,
            "model_tflop_per_step": flops.model / 1e12, "hardware_tflop_per_step": flops.hardware / 1e12,
            "mfu": flops.model / step_s / peak if peak else None,
            "hfu": flops.hardware / step_s / peak if peak else None, "peak": source,
            "peak_memory_gb": peak_memory_gb(device), "loss": loss}


# ---- sampling ---------------------------------------------------------------------------------------

class EnoughSteps(Exception):
    pass


def sampling_model(sizes: Sizes, ctx: Context):
    import torch

    from esolm_dist.inference.export_io import ExportConfig
    from esolm_dist.inference.model import EsoLM

    w = sizes.sampling_width
    dtype = "bfloat16" if ctx.device.type == "cuda" else "float32"
    config = ExportConfig.from_dict({
        "format": "esolm-export-v1", "vocab_size": w["vocab_size"], "hidden_size": w["hidden_size"],
        "num_layers": w["num_layers"], "num_heads": w["num_heads"], "ffn_hidden_size": 4 * w["hidden_size"],
        "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1, "eos_token_id": 0,
        "max_seq_len": max(sizes.sampling_lengths), "variant": "B", "alpha0": 0.25, "dtype": dtype,
    }, "gpu_check sampling config")
    torch.manual_seed(0)
    return EsoLM(config).to(ctx.device, config.torch_dtype).eval()


def sampling_part(box: TimeBox, sizes: Sizes, ctx: Context) -> dict:
    from benchmarks.sampling_speed import ALPHA0, LABELS, NUM_STEPS, time_one_sample

    model = sampling_model(sizes, ctx)
    device = ctx.device
    for method in ALPHA0:  # warm-up: allocator, kernels
        time_one_sample(model, method, 64, 0, device.type)
    cases = [{"method": method, "label": LABELS[method], "batch": 1, "length": length}
             for length in sizes.sampling_lengths[:1] for method in ("eso", "ar", "mdlm")]
    cases.append({"method": "eso", "label": LABELS["eso"], "batch": 64, "length": sizes.batch_length})
    cases += [{"method": method, "label": LABELS[method], "batch": 1, "length": length}
              for length in sizes.sampling_lengths[1:] for method in ("eso", "ar", "mdlm")]
    records = box.run(cases, lambda case: sampling_case(case, model, sizes, device, ALPHA0, NUM_STEPS))
    ratios = []
    for length in sizes.sampling_lengths:
        got = {r["method"]: r["seconds"] for r in records
               if r["status"] == "ok" and r["batch"] == 1 and r["length"] == length}
        if {"eso", "ar", "mdlm"} <= got.keys():
            ratios.append({"length": length, "mdlm_over_eso": got["mdlm"] / got["eso"],
                           "eso_over_ar": got["eso"] / got["ar"]})
    w = sizes.sampling_width
    return {"model": f"{w['num_layers']} x {w['hidden_size']}, {w['num_heads']} heads, V {w['vocab_size']}, "
                     f"random weights, {str(model.head.weight.dtype).removeprefix('torch.')}",
            "schedule": f"first-hitting, T = {NUM_STEPS}, top-p 1", "alpha0": ALPHA0,
            "baselines": "the real baselines' samplers (AR: shift-by-one, cached, one token per step; MDLM: bidirectional, no cache) on a network of the same width and depth; BD3-LM: benchmarks/sampling_speed.py",
            "cases": records, "ratios": ratios}


def sampling_case(case: dict, model, sizes: Sizes, device, alpha0: dict, num_steps: int) -> dict:
    import torch

    from benchmarks.sampling_speed import as_model_of
    from esolm_dist.eso.sampling import first_hitting_schedule, sample, sample_mdlm

    generator = torch.Generator(device=device).manual_seed(0)
    batch, length, method = case["batch"], case["length"], case["method"]
    if method != "mdlm":
        result = sample(as_model_of(model, method), batch, length, method=method, alpha0=alpha0[method],
                        num_steps=num_steps,
                        top_p=1.0, generator=generator, device=device)
        return {"status": "ok", "nfe": result.nfe, "seconds": result.wall_time_s,
                "tokens_per_s": batch * length / result.wall_time_s}
    # MDLM: every step is the same full forward over all L positions; time the first steps and extrapolate
    schedule = first_hitting_schedule(batch, length, alpha0["mdlm"], num_steps, generator).to(device)
    measured = min(sizes.mdlm_steps, schedule.nfe)
    stamps = []

    def stop_after(_decoded: int) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())
        if len(stamps) == measured:
            raise EnoughSteps

    start = time.perf_counter()
    with contextlib.suppress(EnoughSteps):
        sample_mdlm(model, schedule, top_p=1.0, generator=generator, on_step=stop_after)
    per_step = (stamps[-1] - start) / len(stamps)
    return {"status": "ok", "nfe": schedule.nfe, "seconds": per_step * schedule.nfe,
            "tokens_per_s": batch * length / (per_step * schedule.nfe),
            "extrapolated_from_steps": len(stamps)}


# ---- export -----------------------------------------------------------------------------------------

def export_part(box: TimeBox, sizes: Sizes, ctx: Context) -> dict:
    import torch

    from esolm_dist import checkpoint
    from esolm_dist.checkpoint_reader import read_checkpoint_weights
    from esolm_dist.config import ParallelConfig, to_dict
    from esolm_dist.convert import export
    from esolm_dist.data.tokenizer import load_tokenizer
    from esolm_dist.parallel.state import init_parallel

    device = ctx.device
    topo = init_parallel(ParallelConfig(device=device.type))
    tokenizer = load_tokenizer()
    cfg = run_config(ctx, "small.yaml", [*sizes.export_overrides, "model.attention_backend=sdpa"], "export")
    engine, _ = build_training(cfg, tokenizer.vocab_size, tokenizer.mask_id, device)
    try:
        train_step(engine, cfg, tokenizer.mask_id, 0, device)
        meta = {"consumed_samples": cfg.train.micro_batch_size, "run_uid": "gpu-check", "config": to_dict(cfg),
                "tokenizer_vocab": tokenizer.vocab_size, "mask_id": tokenizer.mask_id}
        rank_state = {"rng": checkpoint.rng_state(), "data": {}, "ema": None}
        saved = checkpoint.save(engine.deepspeed, cfg.train.run_dir, 1, meta, rank_state, topo, keep_last=1)
    finally:
        engine.destroy()
    free_memory()
    path = export(saved, ctx.scratch / "export-bf16", dtype="bf16")
    meta, weights = read_checkpoint_weights(saved, use_ema=False)
    logits = compare_export(path, meta, weights, device)
    truth = logits.pop("fp32")
    finite = torch.isfinite(truth)
    err = {name: (value.float() - truth).abs()[finite] for name, value in logits.items()}
    numbers = {"export_vs_training_max": float((logits["export"].float() - logits["training"].float())
                                               .abs()[finite].max()),
               "training_vs_fp32_mean": float(err["training"].mean()),
               "export_vs_fp32_mean": float(err["export"].mean()),
               "training_vs_fp32_max": float(err["training"].max()),
               "export_vs_fp32_max": float(err["export"].max()), "logit_scale": float(truth[finite].abs().max())}
    limit = 2 * numbers["training_vs_fp32_mean"] + 1e-3
    case = {"check": "bf16 export vs bf16 training network on the device (fp32 computation as reference)",
            "status": "ok" if numbers["export_vs_fp32_mean"] <= limit else "failed", **numbers}
    if case["status"] == "failed":
        case["reason"] = (f"the bf16 export's mean logit error {numbers['export_vs_fp32_mean']:.3g} exceeds twice "
                          f"the training network's own bf16 error {numbers['training_vs_fp32_mean']:.3g}")
    m = cfg.model
    return {"model": f"{m.num_layers} x {m.hidden_size}, L = {m.seq_len}, V = {meta['tokenizer_vocab']} (bundled "
                     "tokenizer), one bf16 ZeRO-1 step", "cases": [case]}


def compare_export(path: Path, meta: dict, weights: dict, device) -> dict:
    """Logits of the same fixed rows: the training network in bf16 and in fp32 (bf16-rounded weights), and
    the plain-torch export in bf16."""
    import torch

    from esolm_dist.config import ModelConfig
    from esolm_dist.eso.rows import build_rows
    from esolm_dist.inference.model import EsoLM
    from esolm_dist.model.transformer import EsoTransformer

    model_cfg = ModelConfig(**meta["config"]["model"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, meta["mask_id"], (4, model_cfg.seq_len), generator=gen)
    rows = build_rows(x, alpha0=0.5, kappa=0.5, variant="B", loss_type="elbo", eps=1e-3, mask_id=meta["mask_id"],
                      generator=gen).to(device)
    rounded = {name: tensor.to(torch.bfloat16).float() for name, tensor in weights.items()}
    logits = {}
    with torch.no_grad():
        for name, dtype in (("training", torch.bfloat16), ("fp32", torch.float32)):
            network = EsoTransformer(model_cfg, meta["tokenizer_vocab"], meta["mask_id"]).eval()
            network.load_state_dict(rounded, strict=False)
            network = network.to(device, dtype)
            with exact_fp32():
                logits[name] = network(rows.tokens, rows.positions, rows.masks).float()
            del network
        exported = EsoLM.from_pretrained(path, device=device)
        logits["export"] = exported(rows.tokens, rows.positions, attn_mask=rows.masks.dense()[:, 0]).float()
    return logits
