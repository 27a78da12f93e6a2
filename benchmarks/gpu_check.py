"""Every GPU path of esolm-dist in one command, with every number it measures in one report.

    python benchmarks/gpu_check.py --out gpu_report                  # one H100 / H200: time boxes 6.5 min
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR     # every part shrunk (CI: tests/test_gpu_check.py)

Writes DIR/report.json and DIR/report.md. Four parts, each with a time box (cases are skipped once its
budget is spent, and a case still running at 1.15 x the budget is interrupted); a part that fails is
recorded with a one-line reason and the others still run:

- attention: every backend (flash-attn, FlexAttention, SDPA) against a dense fp32 reference on every mask
  kind (Eso-LM (B) and (A) diffusion pairs and sequential [z0 ; x] rows, a sampling chunk after a KV cache),
  forward and backward, fp32 and bf16: largest error and time per call (what cannot run is skipped with
  the library's own reason);
- training: bf16 optimizer steps through the DeepSpeed engine of configs/small.yaml (12 x 768, L = 1024) and
  of configs/1b.yaml's width with fewer layers, with and without activation checkpointing: step time,
  tokens/s, MFU and HFU (esolm_dist.flops), peak memory;
- sampling: batch 1 at NFE ~ L (T = 10^6, top-p 1) at small.yaml's width with random weights, Eso-LM (B)
  cached against the real baselines' samplers on the same architecture (AR: shift-by-one, cached; MDLM:
  bidirectional without cache, timed over its first steps and extrapolated: each of its steps is the same
  full forward); batch-64 Eso-LM (B) throughput;
- export: one bf16 training step saved as a checkpoint, exported in bf16 (esolm_dist.convert), and the
  export's logits compared with the training network's on the device, both against an fp32 computation.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check_parts import (  # noqa: E402 - needs the repository root on sys.path
    Context,
    attention_part,
    export_part,
    free_memory,
    sampling_part,
    training_part,
)

PARTS = ("attention", "training", "sampling", "export")
HARD_STOP = 1.15  # a case still running at this multiple of its part's time box is interrupted
GPT2_VOCAB = 50258  # GPT-2's 50257 tokens + [MASK]: the vocabulary of small.yaml's corpus


@dataclass(frozen=True)
class Sizes:
    """Everything --tiny shrinks."""

    budget_s: dict
    attention: dict  # rows, heads, head_dim, seq_len, cached, repeats
    training: tuple  # (label, config file, overrides, vocab)
    warmup_steps: int
    timed_steps: int
    sampling_width: dict
    sampling_lengths: tuple
    mdlm_steps: int
    batch_length: int
    export_overrides: tuple


FULL = Sizes(
    budget_s={"attention": 100, "training": 150, "sampling": 95, "export": 45},  # 6.5 min
    attention={"rows": 12, "heads": 12, "head_dim": 64, "seq_len": 1024, "cached": 2046, "repeats": 10},
    training=(("small.yaml (12 x 768)", "small.yaml", (), GPT2_VOCAB),
              ("1b.yaml width, 8 layers (20 x 2048 reduced)", "1b.yaml",
               ("model.num_layers=8", "parallel.tensor=1", "parallel.pipeline=1"), GPT2_VOCAB)),
    warmup_steps=3, timed_steps=8,
    sampling_width={"num_layers": 12, "hidden_size": 768, "num_heads": 12, "vocab_size": 50304},
    sampling_lengths=(2048, 8192), mdlm_steps=32, batch_length=2048,
    # init_std 2 / sqrt(hidden): q.k spreads enough that attention shapes the logits, so a wrong rotary,
    # mask or layout in the export shows in the comparison (at 0.02 attention is nearly uniform)
    export_overrides=("train.micro_batch_size=4", "model.init_std=0.072"),
)
TINY_MODEL = ("model.num_layers=2", "model.hidden_size=64", "model.num_heads=2", "model.seq_len=32",
              "parallel.tensor=1", "parallel.pipeline=1", "train.micro_batch_size=4")
TINY = Sizes(
    budget_s={"attention": 60, "training": 120, "sampling": 60, "export": 60},
    attention={"rows": 4, "heads": 2, "head_dim": 16, "seq_len": 32, "cached": 62, "repeats": 3},
    training=(("small.yaml shrunk to 2 x 64", "small.yaml", TINY_MODEL, 256),
              ("1b.yaml shrunk to 2 x 64", "1b.yaml", TINY_MODEL, 256)),
    warmup_steps=2, timed_steps=2,
    sampling_width={"num_layers": 2, "hidden_size": 64, "num_heads": 2, "vocab_size": 256},
    sampling_lengths=(64, 128), mdlm_steps=8, batch_length=64,
    export_overrides=(*TINY_MODEL, "model.init_std=0.25"),
)


# ---- time boxes and the report's records ------------------------------------------------------------

class TimeBoxExceeded(Exception):
    pass


class TimeBox:
    """A part's budget: ``expired()`` between cases; a hard stop (SIGALRM) at HARD_STOP x the budget."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.start = time.perf_counter()

    def expired(self) -> bool:
        return time.perf_counter() - self.start > self.budget_s

    @contextlib.contextmanager
    def hard_stop(self):
        """SIGALRM raises TimeBoxExceeded, again every 2 s (an exception raised inside a finaliser is lost)
        until :meth:`disarm`."""
        def interrupt(signum, frame):
            raise TimeBoxExceeded(f"still running at {HARD_STOP:g} x the time box of {self.budget_s:g} s")

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, HARD_STOP * self.budget_s, 2.0)
        try:
            yield
        finally:
            self.disarm()
            signal.signal(signal.SIGALRM, previous)

    @staticmethod
    def disarm() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def run(self, cases, run) -> list[dict]:
        """``run(case)`` for each case (a dict of labels) until the box expires; a case that raises is
        failed with a one-line reason, one interrupted by the hard stop is skipped, and the next runs."""
        records = []
        for case in cases:
            if self.expired():
                records.append({**case, "status": "skipped", "reason": f"time box of {self.budget_s:g} s spent"})
                continue
            try:
                records.append({**case, **run(case)})
            except TimeBoxExceeded as exc:
                self.disarm()  # the cases left are skipped: nothing more to interrupt
                records.append({**case, "status": "skipped", "reason": f"interrupted: {exc}"})
            except Exception as exc:  # noqa: BLE001 - recorded, and the next case runs
                records.append({**case, "status": "failed", "reason": one_line(exc)})
            finally:
                free_memory()
        return records


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def run_part(name: str, function, sizes: Sizes, ctx) -> dict:
    box = TimeBox(sizes.budget_s[name])
    print(f"gpu_check: {name} (time box {box.budget_s} s) ...", file=sys.stderr, flush=True)
    try:
        with box.hard_stop():
            part = function(box, sizes, ctx)
        failed = [c for c in part.get("cases", []) if c["status"] == "failed"]
        part = {"status": "failed", "reason": f"{len(failed)} case(s) failed; first: {failed[0]['reason']}",
                **part} if failed else {"status": "ok", **part}
    except Exception as exc:  # noqa: BLE001 - the other parts still run
        traceback.print_exc()
        part = {"status": "failed", "reason": one_line(exc)}
    finally:
        free_memory()
    part["seconds"] = round(time.perf_counter() - box.start, 1)
    part["budget_s"] = box.budget_s
    print(f"gpu_check: {name} {part['status']} in {part['seconds']} s", file=sys.stderr, flush=True)
    return part


def device_info(device) -> dict:
    import torch

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    from esolm_dist.kernels.fused import apex_fused_adam, apex_layer_norm

    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "flash_attn": version("flash-attn"), "triton": version("triton"), "deepspeed": version("deepspeed"),
            "megatron_core": version("megatron-core"), "python": platform.python_version(),
            "nvidia_apex": bool(apex_layer_norm() and apex_fused_adam()), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", count=torch.cuda.device_count())
    else:
        from benchmarks.sampling_speed import machine_name

        info.update(name=machine_name("cpu"), memory_gb=round(os.sysconf("SC_PAGE_SIZE")
                                                              * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
    return info


# ---- the report -------------------------------------------------------------------------------------

def render_markdown(report: dict) -> str:
    d = report["device"]
    lines = [f"# GPU check: {d.get('name')}", "",
             f"{d['type']}; torch {d['torch']}, CUDA {d['cuda']}, flash-attn {d['flash_attn']}, triton {d['triton']}, "
             f"DeepSpeed {d['deepspeed']}, megatron-core {d['megatron_core']}, NVIDIA apex {d['nvidia_apex']}; "
             f"{d.get('memory_gb')} GiB; host {d['host']}; {'--tiny' if report['tiny'] else 'full sizes'}; "
             f"started {report['started']}, {report['wall_s']} s in all.", ""]
    for part in PARTS:
        entry = report[part]
        lines += [f"## {part}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""), "",
                  f"{entry.get('seconds', 0)} s of a {entry.get('budget_s')} s time box."]
        tables = {key: value for key, value in entry.items() if isinstance(value, list) and value}
        lines += [f"- {key}: {value}" for key, value in entry.items()
                  if key not in ("status", "reason", "seconds", "budget_s") and key not in tables]
        for rows in tables.values():
            lines += ["", *_table(rows)]
        lines.append("")
    return "\n".join(lines)


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(_cell(row.get(key)) for key in keys) + " |" for row in rows])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and report.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="shrink every part (CI on CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu --tiny")
    sizes = TINY if args.tiny else FULL
    wanted = [part for part in args.parts.split(",") if part]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": args.tiny, "device": device_info(device)}
    functions = {"attention": attention_part, "training": training_part, "sampling": sampling_part,
                 "export": export_part}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        ctx = Context(device, Path(scratch))
        for part in PARTS:
            report[part] = (run_part(part, functions[part], sizes, ctx) if part in wanted
                            else {"status": "skipped", "reason": "not in --parts"})
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(render_markdown(report))
    summary = ", ".join(f"{part} {report[part]['status']}" for part in PARTS)
    print(f"gpu_check: {summary}; {report['wall_s']} s; wrote {args.out}/report.json and report.md")
    return 0 if all(report[part]["status"] != "failed" for part in PARTS) else 1


if __name__ == "__main__":
    sys.exit(main())
