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
    parser = argparse.ArgumentParser(prog="esolm-convert", description="Export a training checkpoint for sampling.",
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
    parser.epilog = subcommands_help(sub)
    return parser


def subcommands_help(sub: argparse._SubParsersAction) -> str:
    """Every subcommand's own --help, for the end of the top-level one."""
    return "\n".join(["Each subcommand's options (also: esolm-convert SUBCOMMAND --help):", "",
                      *(parser.format_help() for parser in sub.choices.values())])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from esolm_dist.convert import export  # torch, DeepSpeed, megatron-core: only once the arguments are read
    from esolm_dist.errors import CheckpointError
    from esolm_dist.inference.export_io import ExportError

    try:
        path = export(args.checkpoint, args.out, args.ema, args.dtype, args.verify, args.overwrite)
    except (CheckpointError, ExportError) as exc:
        print(f"esolm-convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"esolm-convert: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
