"""Exact-likelihood evaluation of an export (paper section 2, Theorem 3.1): ``esolm-likelihood``.

For each validation sequence, K orders sigma_k (a Binomial(L, alpha_0) random subset first, the rest
ascending) each give log p_sigma(x) in one causal pass; the importance-weighted bound
L_AO^K = -(log(1/K) + logsumexp_k log p_sigma_k(x)) >= -log p(x) tightens as K grows.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from esolm_dist.eso.likelihood import importance_weighted_nll
from esolm_dist.eso.masks import RowMaskSpec
from esolm_dist.inference.export_io import ExportError
from esolm_dist.inference.model import EsoLM


def export_logits_fn(model: EsoLM):
    """The likelihood code's logits_fn over an exported model (dense Eso-LM masks)."""
    def logits(tokens: torch.Tensor, positions: torch.Tensor, masks: RowMaskSpec) -> torch.Tensor:
        return model(tokens, positions, attn_mask=masks.dense(tokens.device)[:, 0])
    return logits


@torch.no_grad()
def evaluate_likelihood(model: EsoLM, batches, num_orders: int, alpha0: float, seed: int) -> dict[str, float]:
    """Mean IW bound per token over the batches (LongTensor [B, L] each), and its perplexity."""
    if model.config.variant != "B":
        raise ExportError("the exact likelihood needs causal attention in sorted order: Eso-LM (B) exports only")
    generator = torch.Generator().manual_seed(seed)
    logits = export_logits_fn(model)
    total, tokens = 0.0, 0
    for x in batches:
        x = x.to(model.head.weight.device)
        total += float(importance_weighted_nll(logits, x, num_orders, alpha0, model.mask_token_id, generator).sum())
        tokens += x.numel()
    if tokens == 0:
        raise ExportError("no validation sequences to evaluate")
    per_token = total / tokens
    return {"nll_bound_per_token": per_token, "ppl_bound": math.exp(min(per_token, 50.0)), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="esolm-likelihood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export folder (tools/convert.py export)")
    parser.add_argument("--shards", required=True, help="shard folder with a validation split (tools/make_shards.py)")
    parser.add_argument("--orders", type=int, default=8, help="K, orders per sequence (default 8)")
    parser.add_argument("--alpha0", type=float, default=None, help="alpha_0 of the orders (default: the export's)")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to evaluate (default 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for flag, value in (("--orders", args.orders), ("--batches", args.batches), ("--batch-size", args.batch_size)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.alpha0 is not None and not 0.0 <= args.alpha0 <= 1.0:
        parser.error(f"--alpha0 must lie in [0, 1], got {args.alpha0}")
    from esolm_dist.data.errors import DataError
    from esolm_dist.data.loader import build_loader
    from esolm_dist.data.tokenizer import load_tokenizer

    try:
        model = EsoLM.from_pretrained(args.model, device=args.device, dtype=torch.float32)
        tokenizer = load_tokenizer(f"{args.model}/tokenizer.json")
        loader = build_loader(args.shards, split="val", seq_len=model.config.max_seq_len,
                              micro_batch_size=args.batch_size, num_workers=0, seed=args.seed,
                              tokenizer_fingerprint=tokenizer.fingerprint, infinite=False)
        alpha0 = model.config.alpha0 if args.alpha0 is None else args.alpha0
        result = evaluate_likelihood(model, itertools.islice(loader, args.batches), args.orders, alpha0, args.seed)
    except (ExportError, DataError, ValueError) as exc:
        print(f"esolm-likelihood: error: {exc}", file=sys.stderr)
        return 2
    print(f"esolm-likelihood: K={args.orders} alpha0={alpha0}: -log p(x) <= {result['nll_bound_per_token']:.4f} "
          f"nats/token (perplexity <= {result['ppl_bound']:.2f}) over {result['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
