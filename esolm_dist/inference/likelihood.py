"""Exact-likelihood evaluation of an export (paper section 2, Theorem 3.1): ``esolm-likelihood``.

For each validation sequence, K orders sigma_k (a Binomial(L, alpha_0) random subset first, the rest
ascending) each give log p_sigma(x) in one causal pass; the importance-weighted bound
L_AO^K = -(log(1/K) + logsumexp_k log p_sigma_k(x)) >= -log p(x) tightens as K grows.

Only argparse at import time: torch and the model are imported when they are used, so ``--help``
and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from esolm_dist.cli_help import DefaultsHelpFormatter

if TYPE_CHECKING:
    import torch

    from esolm_dist.eso.masks import RowMaskSpec
    from esolm_dist.inference.model import EsoLM


def export_logits_fn(model: EsoLM, on_pass: Callable[[], None] | None = None):
    """The likelihood code's logits_fn over an exported model (dense Eso-LM masks); on_pass() is
    called after each causal pass (progress)."""
    def logits(tokens: torch.Tensor, positions: torch.Tensor, masks: RowMaskSpec) -> torch.Tensor:
        out = model(tokens, positions, attn_mask=masks.dense(tokens.device)[:, 0])
        if on_pass is not None:
            on_pass()
        return out
    return logits


def evaluate_likelihood(model: EsoLM, batches, num_orders: int, alpha0: float, seed: int,
                        on_pass: Callable[[], None] | None = None) -> dict[str, float]:
    """Mean IW bound per token over the batches (LongTensor [B, L] each), and its perplexity."""
    import torch

    from esolm_dist.eso.likelihood import importance_weighted_nll
    from esolm_dist.inference.export_io import ExportError

    if model.config.model != "esolm":
        raise ExportError(f"the importance-weighted bound is Eso-LM's; this is an {model.config.model} export "
                          "(config.json \"model\")")
    if model.config.variant != "B":
        raise ExportError("the exact likelihood needs causal attention in sorted order: Eso-LM (B) exports only")
    generator = torch.Generator().manual_seed(seed)
    logits = export_logits_fn(model, on_pass)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for x in batches:
            x = x.to(model.head.weight.device)
            total += float(importance_weighted_nll(logits, x, num_orders, alpha0, model.mask_token_id,
                                                   generator).sum())
            tokens += x.numel()
    if tokens == 0:
        raise ExportError("no validation sequences to evaluate")
    per_token = total / tokens
    return {"nll_bound_per_token": per_token, "ppl_bound": math.exp(min(per_token, 50.0)), "tokens": tokens}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esolm-likelihood", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="export folder (tools/convert.py export)")
    parser.add_argument("--shards", required=True, help="shard folder with a validation split (tools/make_shards.py)")
    parser.add_argument("--orders", type=int, default=8, help="K, orders per sequence")
    parser.add_argument("--alpha0", type=float, default=None, help="alpha_0 of the orders (default: the export's)")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to evaluate")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the orders and the validation order")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when one is visible)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--orders", args.orders), ("--batches", args.batches), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.alpha0 is not None and not 0.0 <= args.alpha0 <= 1.0:
        parser.error(f"--alpha0 must lie in [0, 1], got {args.alpha0}")
    import torch

    from esolm_dist.data.errors import DataError
    from esolm_dist.data.loader import build_loader
    from esolm_dist.data.tokenizer import load_tokenizer
    from esolm_dist.inference.export_io import ExportError
    from esolm_dist.inference.model import EsoLM
    from esolm_dist.progress import Progress

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = EsoLM.from_pretrained(args.model, device=device, dtype=torch.float32)
        tokenizer = load_tokenizer(f"{args.model}/tokenizer.json")
        loader = build_loader(args.shards, split="val", seq_len=model.config.max_seq_len,
                              micro_batch_size=args.batch_size, num_workers=0, seed=args.seed,
                              tokenizer_fingerprint=tokenizer.fingerprint, infinite=False)
        alpha0 = model.config.alpha0 if args.alpha0 is None else args.alpha0
        with Progress(args.batches * args.orders, "esolm-likelihood: causal passes", "passes") as progress:
            result = evaluate_likelihood(model, itertools.islice(loader, args.batches), args.orders, alpha0,
                                         args.seed, on_pass=progress.update)
    except (ExportError, DataError, ValueError) as exc:
        print(f"esolm-likelihood: error: {exc}", file=sys.stderr)
        return 2
    print(f"esolm-likelihood: K={args.orders} alpha0={alpha0}: -log p(x) <= {result['nll_bound_per_token']:.4f} "
          f"nats/token (perplexity <= {result['ppl_bound']:.2f}) over {result['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
