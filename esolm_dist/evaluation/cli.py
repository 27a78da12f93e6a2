"""`esolm-eval`: generative perplexity, unigram entropy, NFE and wall time of an export's samples over
a sweep of settings (paper section 5), written to a folder and one MLflow run.

    esolm-eval --model EXPORT --evaluator gpt2-large --num-samples N --length L --steps T1 T2 ... --out DIR
    torchrun --nproc_per_node 8 -m esolm_dist.evaluation.cli ...   # the samples split between 8 processes

Only argparse at import time, so ``--help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from esolm_dist.cli_help import DefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esolm-eval",
        description="Sample an export over settings (steps T x alpha0) and score the samples: generative "
                    "perplexity under an evaluator causal LM, unigram entropy, NFE and wall time per batch.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", required=True, metavar="EXPORT_DIR", help="export folder (esolm-convert)")
    parser.add_argument("--evaluator", default="gpt2-large", metavar="NAME_OR_DIR",
                        help="transformers causal LM: a Hugging Face name (downloaded once) or a local folder "
                             "(read offline)")
    parser.add_argument("--num-samples", type=int, required=True, help="samples per setting")
    parser.add_argument("--length", type=int, required=True, help="tokens per sample, at most max_seq_len")
    parser.add_argument("--steps", type=int, nargs="+", required=True, metavar="T",
                        help="T of the first-hitting schedule, one setting each")
    parser.add_argument("--alpha0", type=float, nargs="+", default=None, metavar="A",
                        help="alpha0 values, one setting each per T (default: the export's alpha0)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass, 1 = no nucleus")
    parser.add_argument("--seed", type=int, default=0, help="seed of every batch's schedule and noise")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="samples per sampling call (fixed: results do not depend on the process count)")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="evaluator chunks per forward")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where model and evaluator run (cuda: each process takes GPU LOCAL_RANK)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="results.json, results.csv, samples.jsonl, pareto.png go here")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    return parser


def _check_args(args: argparse.Namespace, max_seq_len: int) -> str | None:
    """The first problem with the arguments, as one line, or None."""
    import torch

    from esolm_dist.inference.export_io import CONFIG_FILE

    if not 1 <= args.length <= max_seq_len:
        return f"--length {args.length} must lie in [1, {max_seq_len}] (max_seq_len in {args.model}/{CONFIG_FILE})"
    if min(args.num_samples, args.batch_size, args.eval_batch_size) < 1:
        return "--num-samples, --batch-size and --eval-batch-size must be positive"
    if min(args.steps) < 1:
        return f"--steps must all be >= 1, got {args.steps}"
    if not 0.0 < args.top_p <= 1.0:
        return f"--top-p must lie in (0, 1], got {args.top_p}"
    if args.alpha0 is not None and not all(0.0 <= a <= 1.0 for a in args.alpha0):
        return f"--alpha0 values must lie in [0, 1], got {args.alpha0}"
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is visible; use --device cpu"
    return None


def _load_evaluator(args: argparse.Namespace, device: str):
    """The evaluator, or one line saying why it cannot be loaded."""
    from esolm_dist.evaluation.evaluator import ArExportEvaluator, CausalLMEvaluator, is_esolm_export

    if is_esolm_export(args.evaluator):
        from esolm_dist.inference.export_io import ExportError

        try:
            return ArExportEvaluator(args.evaluator, device=device, batch_size=args.eval_batch_size)
        except (ExportError, ValueError) as err:
            raise SystemExit(f"esolm-eval: error: --evaluator {args.evaluator}: {err}") from None
    try:
        return CausalLMEvaluator(args.evaluator, device=device, batch_size=args.eval_batch_size)
    except (OSError, ValueError) as err:
        where = "the folder" if Path(args.evaluator).is_dir() else "the name (or pass a local folder)"
        raise SystemExit(f"esolm-eval: error: --evaluator {args.evaluator}: cannot load a transformers causal LM "
                         f"({str(err).splitlines()[0]}); check {where}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from esolm_dist.evaluation import ranks
    from esolm_dist.evaluation.results import write_results
    from esolm_dist.evaluation.sweep import SweepContext, export_method, run_share, settings_grid, summarise
    from esolm_dist.evaluation.tracking import log_evaluation, tracking_uri
    from esolm_dist.inference.export_io import CONFIG_FILE, ExportError, read_export, read_training_run
    from esolm_dist.inference.model import EsoLM

    try:
        export = read_export(args.model)
    except ExportError as err:
        print(f"esolm-eval: error: {err}", file=sys.stderr)
        return 2
    problem = _check_args(args, export.config.max_seq_len)
    if problem:
        print(f"esolm-eval: error: {problem}", file=sys.stderr)
        return 2
    rank, world = ranks.init_ranks()
    device = f"cuda:{ranks.local_rank()}" if args.device == "cuda" else "cpu"
    try:
        evaluator = _load_evaluator(args, device)
        model = EsoLM.from_export(export, device=device)
        method = export_method(export)
        settings = settings_grid(method, args.steps, args.alpha0 or [export.config.alpha0])
        ctx = SweepContext(model, export, evaluator, args.length, args.top_p, args.batch_size, args.seed, device)

        def report(batch: dict) -> None:
            s = settings[batch["setting_index"]]
            print(f"esolm-eval[{rank}]: {s.method} T={s.steps} alpha0={s.alpha0:g} batch {batch['batch']}: "
                  f"NFE {batch['nfe']}, {batch['seconds']:.2f} s", file=sys.stderr)

        batches = ranks.gather_to_first(run_share(ctx, settings, args.num_samples, rank, world, report), world)
    finally:
        ranks.close_ranks(world)
    if rank != 0:
        return 0
    rows, samples = summarise(settings, batches)
    run_settings = {"model": str(export.path.resolve()), "evaluator": args.evaluator, "length": args.length,
                    "top_p": args.top_p, "seed": args.seed, "batch_size": args.batch_size,
                    "variant": export.config.variant,
                    "model_config_sha256": hashlib.sha256((export.path / CONFIG_FILE).read_bytes()).hexdigest()}
    files = write_results(Path(args.out), rows, samples, run_settings)
    for row in rows:
        print(f"esolm-eval: {row['method']} T={row['steps']} alpha0={row['alpha0']:g}: gen PPL {row['gen_ppl']:.2f}, "
              f"entropy {row['entropy']:.3f}, NFE {row['nfe']:.1f}, {row['seconds']:.2f} s per batch", file=sys.stderr)
    if not args.no_mlflow:
        uri = tracking_uri(args.mlflow_uri)
        params = {**run_settings, "num_samples": args.num_samples, "steps": args.steps,
                  "alpha0": sorted({s.alpha0 for s in settings}), "method": method, "world_size": world}
        run_id = log_evaluation(uri, params, rows, files, read_training_run(export.path))
        print(f"esolm-eval: MLflow run {run_id} in {uri} (experiment esolm-eval)", file=sys.stderr)
    print(f"esolm-eval: wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
