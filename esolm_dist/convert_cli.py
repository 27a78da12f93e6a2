"""``esolm-convert`` / ``python tools/convert.py``: the command line of esolm_dist.convert.

The parser is built before anything heavy is imported (torch, DeepSpeed and megatron-core take
seconds), so ``--help`` and a mistyped flag answer at once; the top-level ``--help`` shows every
subcommand's options.
"""

from __future__ import annotations

import argparse
import sys

from esolm_dist.cli_help import DefaultsHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esolm-convert", description="Export a training checkpoint for sampling, "
                                     "or import a released Eso-LM checkpoint.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="checkpoint (any TP x PP layout, any ZeRO stage) -> safetensors export folder",
                        description="Write one export folder (model.safetensors in the reference layout, config.json, "
                                    "the tokenizer, a model card) from a training checkpoint.",
                        formatter_class=DefaultsHelpFormatter)
    ex.add_argument("--checkpoint", required=True, help="RUN_DIR/checkpoints/latest, a step_* dir or a run dir")
    ex.add_argument("--out", required=True, help="export folder to create")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights instead of the live ones")
    ex.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the exported weights")
    ex.add_argument("--verify", action="store_true", help="check export logits against the checkpoint's")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    ex.add_argument("--format", choices=("export", "reference"), default="export",
                    help="reference: a Lightning .ckpt of the paper's DiT (identity adaLN) at --out, from a "
                         "checkpoint or an export folder")
    add_import_parser(sub)
    parser.epilog = subcommands_help(sub)
    return parser


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("import", help="released Eso-LM Lightning checkpoint -> export folder",
                        description="Fold a Lightning .ckpt of the paper's adaLN DiT (s-sahoo/Eso-LMs) into an "
                                    "export folder (esolm_dist.reference).",
                        formatter_class=DefaultsHelpFormatter)
    im.add_argument("--reference", required=True, metavar="CKPT", help="Lightning .ckpt of s-sahoo/Eso-LMs")
    im.add_argument("--out", required=True, help="export folder to create")
    im.add_argument("--tokenizer", required=True, metavar="TOKENIZER_JSON",
                    help="tokenizers JSON of the checkpoint's vocabulary with [MASK] as its last id "
                         "(GPT-2's tokenizer.json plus [MASK] = 50257 for the released models)")
    im.add_argument("--ema", action="store_true", help="import the EMA weights (ema.shadow_params)")
    im.add_argument("--verify", action="store_true",
                    help="compare the export's logits with the unfolded adaLN network's (fp32, 1e-5)")
    im.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    im.add_argument("--num-heads", type=int, default=None, help="override model.n_heads")
    im.add_argument("--seq-len", type=int, default=None, help="override model.length")
    im.add_argument("--variant", choices=("A", "B"), default=None, help="override algo.diffusion_attn_mode")
    im.add_argument("--alpha0", type=float, default=None, help="override algo.alpha_0")


def subcommands_help(sub: argparse._SubParsersAction) -> str:
    """Every subcommand's own --help, for the end of the top-level one."""
    return "\n".join(["Each subcommand's options (also: esolm-convert SUBCOMMAND --help):", "",
                      *(parser.format_help() for parser in sub.choices.values())])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torch, DeepSpeed, megatron-core: only once the arguments are read
    from esolm_dist.convert import export
    from esolm_dist.data.errors import DataError
    from esolm_dist.errors import CheckpointError
    from esolm_dist.inference.export_io import ExportError
    from esolm_dist.reference.convert import run_import

    try:
        if args.command == "import":
            path = run_import(args)
        else:
            path = export(args.checkpoint, args.out, args.ema, args.dtype, args.verify, args.overwrite, args.format)
    except (CheckpointError, ExportError, DataError) as exc:
        print(f"esolm-convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"esolm-convert: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
