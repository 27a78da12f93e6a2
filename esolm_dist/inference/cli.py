"""`esolm-sample`: draw text samples from an export folder with its model's sampler (Eso-LM: paper
Alg. 2 + 3; the baselines AR, MDLM, BD3-LM: esolm_dist.eso.sampling), and report NFE and wall time.

Only argparse at import time: torch and the model are imported once the arguments are read, so
``--help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from typing import TYPE_CHECKING

from esolm_dist.cli_help import DefaultsHelpFormatter
from esolm_dist.eso import DEFAULT_METHOD, METHODS

if TYPE_CHECKING:
    from esolm_dist.inference.export_io import Export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esolm-sample",
        description="Sample text from an export folder with the sampler of its model (config.json "
                    '"model"): eso (Eso-LM (B): one KV cache over the diffusion and sequential phases), '
                    "ar (one token per step, KV cache), mdlm (a full bidirectional forward per step, no "
                    "cache), bd3lm (blocks left to right, finished blocks in the KV cache).",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", required=True, metavar="EXPORT_DIR",
                        help="export folder (model.safetensors, config.json, tokenizer.json, README.md)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    parser.add_argument("--length", type=int, required=True, help="tokens per sample, at most max_seq_len")
    parser.add_argument("--steps", type=int, default=None,
                        help="T of the first-hitting schedule (default: --length; unused with --subcontext-len)")
    parser.add_argument("--alpha0", type=float, default=None,
                        help="expected fraction decoded by diffusion (default: the export's alpha0)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass, 1 = no nucleus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schedule and the sampling noise")
    parser.add_argument("--method", choices=tuple(METHODS), default=None,
                        help="sampler (default: the export's model's; each export has exactly one)")
    parser.add_argument("--variant", choices=("A", "B"), default=None,
                        help="Eso-LM variant for --method eso (default: the export's variant)")
    parser.add_argument("--subcontext-len", type=int, default=None, metavar="S",
                        help="block schedule instead of first-hitting: S steps of L/S interleaved tokens")
    parser.add_argument("--subcontext-shuffle", action="store_true", help="random order of the S blocks")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per call (default: up to 16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl",
                        help="write one JSON line per sample (text, token ids, NFE and the settings) instead "
                             "of printing the texts")
    return parser


def _check_args(args: argparse.Namespace, config) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    import torch

    from esolm_dist.inference.export_io import CONFIG_FILE

    if not 1 <= args.length <= config.max_seq_len:
        return (f"--length {args.length} must lie in [1, {config.max_seq_len}] (max_seq_len in "
                f"{args.model}/{CONFIG_FILE})")
    if args.num_samples < 1 or (args.batch_size is not None and args.batch_size < 1):
        return "--num-samples and --batch-size must be positive"
    if args.steps is not None and args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if not 0.0 < args.top_p <= 1.0:
        return f"--top-p must lie in (0, 1], got {args.top_p}"
    if args.alpha0 is not None and not 0.0 <= args.alpha0 <= 1.0:
        return f"--alpha0 must lie in [0, 1], got {args.alpha0}"
    if METHODS[method_of(args, config.model)] != config.model:
        return (f"--method {args.method} samples {METHODS[args.method]} models, but {args.model} is an "
                f"{config.model} export (\"model\" in {CONFIG_FILE}); use --method {DEFAULT_METHOD[config.model]} "
                "or leave --method out")
    if config.model == "bd3lm" and args.length % config.block_size:
        return f"--length {args.length} must be a multiple of the export's block_size {config.block_size} (bd3lm)"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is visible; use --device cpu"
    return None


def method_of(args: argparse.Namespace, model: str) -> str:
    """--method, or the export's model's own sampler."""
    return args.method or DEFAULT_METHOD[model]


def settings(args: argparse.Namespace, export: Export) -> dict:
    """What produced the samples, resolved (the export's defaults filled in); written with each sample."""
    from esolm_dist.inference.export_io import CONFIG_FILE

    return {"method": method_of(args, export.config.model), "model_kind": export.config.model, "variant": args.variant or export.config.variant,
            "alpha0": export.config.alpha0 if args.alpha0 is None else args.alpha0,
            "steps": None if args.subcontext_len is not None else args.steps or args.length,
            "subcontext_len": args.subcontext_len, "subcontext_shuffle": args.subcontext_shuffle,
            "top_p": args.top_p, "seed": args.seed, "length": args.length, "model": str(export.path.resolve()),
            "model_config_sha256": hashlib.sha256((export.path / CONFIG_FILE).read_bytes()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from esolm_dist.eso.sampling import sample
    from esolm_dist.inference.export_io import ExportError, read_export
    from esolm_dist.inference.model import EsoLM
    from esolm_dist.progress import Progress

    try:
        export = read_export(args.model)
    except ExportError as err:
        print(f"esolm-sample: error: {err}", file=sys.stderr)
        return 2
    problem = _check_args(args, export.config)
    if problem:
        print(f"esolm-sample: error: {problem}", file=sys.stderr)
        return 2
    model = EsoLM.from_export(export, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    recorded = settings(args, export)
    batch_size = args.batch_size or min(args.num_samples, 16)
    records, total_time = [], 0.0
    try:
        with Progress(math.ceil(args.num_samples / batch_size) * args.length, "esolm-sample: decoding",
                      "positions") as progress:
            while len(records) < args.num_samples:
                result = sample(model, min(batch_size, args.num_samples - len(records)), args.length,
                                method=recorded["method"], variant=recorded["variant"], alpha0=recorded["alpha0"],
                                num_steps=args.steps, top_p=args.top_p, subcontext_len=args.subcontext_len,
                                subcontext_shuffle=args.subcontext_shuffle, generator=generator, device=args.device,
                                on_step=progress.update)
                total_time += result.wall_time_s
                for ids in result.tokens.tolist():
                    records.append({"sample": len(records),
                                    "text": export.tokenizer.decode(ids, skip_special_tokens=False), "token_ids": ids,
                                    "nfe": result.nfe, "batch_wall_time_s": result.wall_time_s, **recorded})
    except ValueError as err:
        print(f"esolm-sample: error: {err}", file=sys.stderr)
        return 2
    _emit(records, args.out)
    print(f"esolm-sample: {len(records)} samples of {args.length} tokens, method {recorded['method']}, "
          f"NFE per batch {sorted({r['nfe'] for r in records})}, wall time {total_time:.2f} s, "
          f"attention {model.attention_backend}", file=sys.stderr)
    return 0


def _emit(records: list[dict], out_path: str | None) -> None:
    if out_path is None:
        for record in records:
            print(f"=== sample {record['sample']} (NFE {record['nfe']}, batch {record['batch_wall_time_s']:.2f} s) ===")
            print(record["text"])
        return
    with open(out_path, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
