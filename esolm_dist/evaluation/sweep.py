"""The settings (method, steps T, alpha0) x seeded batches of samples: draw, score, and sum up.

Batch b of setting s is seeded from (seed, s, b) alone and batches have a fixed size, so the samples do
not depend on how many processes share the work: process r draws the batches b with b % world == r.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np
import torch

from esolm_dist.eso import DEFAULT_METHOD, METHODS, model_alpha0
from esolm_dist.eso.sampling import sample
from esolm_dist.evaluation.entropy import unigram_entropy
from esolm_dist.evaluation.evaluator import Evaluator
from esolm_dist.evaluation.gen_ppl import evaluator_ids, perplexity, sample_nll
from esolm_dist.inference.export_io import Export


@dataclasses.dataclass(frozen=True)
class Setting:
    method: str
    steps: int
    alpha0: float


def export_method(export: Export) -> str:
    """The sampler an export is evaluated with: its model's own (config.json "model")."""
    return DEFAULT_METHOD[export.config.model]


def settings_grid(method: str, steps: list[int], alpha0s: list[float]) -> list[Setting]:
    """Every (T, alpha0) for the method, in the order given. Only Eso-LM has an alpha0 to sweep: the
    baselines' is fixed by their model (0 for AR, which also has one setting whatever T: NFE = L)."""
    if method != "eso":
        fixed = model_alpha0(METHODS[method], 0.0)
        return [Setting(method, t, fixed) for t in (steps[:1] if method == "ar" else steps)]
    return [Setting(method, t, a) for t in steps for a in alpha0s]


def batch_seed(seed: int, setting_index: int, batch_index: int) -> int:
    """A well-mixed 63-bit seed for one batch (neighbouring batches get unrelated streams)."""
    return int(np.random.SeedSequence([seed, setting_index, batch_index]).generate_state(2, np.uint64)[0] >> 1)


@dataclasses.dataclass
class SweepContext:
    """What every batch needs: the network and its export, the evaluator, the sampling options."""

    model: torch.nn.Module
    export: Export
    evaluator: Evaluator
    length: int
    top_p: float
    batch_size: int
    seed: int
    device: str


def run_batch(ctx: SweepContext, settings: list[Setting], setting_index: int, batch_index: int,
              size: int) -> dict:
    """Draw one batch, score it; its NFE, decoding wall time and per-sample records."""
    setting = settings[setting_index]
    generator = torch.Generator(device=ctx.device).manual_seed(batch_seed(ctx.seed, setting_index, batch_index))
    result = sample(ctx.model, size, ctx.length, method=setting.method, variant=ctx.export.config.variant,
                    alpha0=setting.alpha0, num_steps=setting.steps, top_p=ctx.top_p, generator=generator,
                    device=ctx.device)
    tokens = result.tokens.tolist()
    tokenizer, eos_id = ctx.export.tokenizer, ctx.export.config.eos_token_id
    nlls = sample_nll(ctx.evaluator, [evaluator_ids(ids, tokenizer, eos_id, ctx.evaluator) for ids in tokens])
    samples = [{"sample": batch_index * ctx.batch_size + i, **dataclasses.asdict(setting),
                "text": tokenizer.decode(ids, skip_special_tokens=False), "token_ids": ids, "nll": nll,
                "scored_tokens": count, "entropy": unigram_entropy(ids), "nfe": result.nfe}
               for i, (ids, (nll, count)) in enumerate(zip(tokens, nlls, strict=True))]
    return {"setting_index": setting_index, "batch": batch_index, "nfe": result.nfe,
            "seconds": result.wall_time_s, "samples": samples}


def run_share(ctx: SweepContext, settings: list[Setting], num_samples: int, rank: int, world: int,
              on_batch=None) -> list[dict]:
    """This process's batches of every setting."""
    num_batches = math.ceil(num_samples / ctx.batch_size)
    batches = []
    for setting_index in range(len(settings)):
        for batch_index in range(rank, num_batches, world):
            size = min(ctx.batch_size, num_samples - batch_index * ctx.batch_size)
            batches.append(run_batch(ctx, settings, setting_index, batch_index, size))
            if on_batch is not None:
                on_batch(batches[-1])
    return batches


def summarise(settings: list[Setting], batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """One row per setting (NFE and seconds per batch, averaged; gen PPL over all its samples; mean
    entropy) and all samples, ordered by setting then sample whatever order the batches came in."""
    batches = sorted(batches, key=lambda b: (b["setting_index"], b["batch"]))
    rows, samples = [], []
    for index, setting in enumerate(settings):
        mine = [b for b in batches if b["setting_index"] == index]
        drawn = [s for b in mine for s in b["samples"]]
        rows.append({**dataclasses.asdict(setting), "nfe": statistics.fmean(b["nfe"] for b in mine),
                     "seconds": statistics.fmean(b["seconds"] for b in mine),
                     "gen_ppl": perplexity([(s["nll"], s["scored_tokens"]) for s in drawn]),
                     "entropy": statistics.fmean(s["entropy"] for s in drawn),
                     "num_samples": len(drawn), "num_batches": len(mine),
                     "scored_tokens": sum(s["scored_tokens"] for s in drawn)})
        samples.extend(drawn)
    return rows, samples
