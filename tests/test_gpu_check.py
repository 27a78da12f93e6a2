"""benchmarks/gpu_check.py: the CPU mode runs every part end to end and writes a well-formed report; time boxes
and failures stay inside their case."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("attention", "training", "sampling", "export")
STATUSES = {"ok", "failed", "skipped"}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cpu_skip_is_documented(case: dict) -> bool:
    """What cannot run on a CPU: flash-attn, FlexAttention's backward, and FlexAttention on the cached chunk."""
    if case["backend"] == "flash":
        return "flash" in case["reason"]
    if case["backend"] == "flex":
        return case.get("pass") == "backward" or case["mask"] == "sampling chunk after cache"
    return False


@pytest.mark.slow
def test_cpu_tiny_run_writes_a_complete_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    assert set(PARTS) | {"device"} <= report.keys()
    assert {"name", "memory_gb", "torch", "cuda", "flash_attn"} <= report["device"].keys()
    for part in PARTS:
        entry = report[part]
        assert entry["status"] == "ok", (part, entry.get("reason"))  # every part runs on CPU
        assert finite(entry["seconds"]) and entry["seconds"] <= 1.15 * entry["budget_s"]
        assert f"## {part}: ok" in markdown
        for case in entry["cases"]:
            assert case["status"] in STATUSES and case["status"] != "failed", case
            if case["status"] != "ok":
                assert case["reason"], case

    attention = report["attention"]["cases"]
    ran = [c for c in attention if c["status"] == "ok"]
    assert all(cpu_skip_is_documented(c) for c in attention if c["status"] == "skipped")
    kinds = {"B diffusion pairs", "B sequential [z0 ; x]", "A diffusion pairs", "A sequential [z0 ; x]",
             "sampling chunk after cache"}
    for backend, passes in (("sdpa", {"forward", "backward"}), ("flex", {"forward"})):
        for dtype in ("bf16", "fp32"):
            done = {(c["mask"], c["pass"]) for c in ran if c["backend"] == backend and c["dtype"] == dtype}
            masks = kinds if backend == "sdpa" else kinds - {"sampling chunk after cache"}
            assert done == {(m, p) for m in masks for p in passes}, (backend, dtype, done)
    assert all(finite(c["max_abs_error"]) and finite(c["time_per_call_ms"]) for c in ran)

    training = report["training"]["cases"]
    assert {(c["config"], c["activation_checkpointing"]) for c in training} == {
        (config, ckpt) for config in ("small.yaml", "1b.yaml") for ckpt in (False, True)}
    for case in training:
        for key in ("step_time_s", "tokens_per_s", "mfu", "hfu", "peak_memory_gb", "loss"):
            assert finite(case[key]) and case[key] > 0, (key, case)
        assert case["hfu"] > case["mfu"]  # SDPA computes every pair; checkpointing recomputes the blocks

    sampling = report["sampling"]
    assert {(c["method"], c["batch"]) for c in sampling["cases"]} == {("eso", 1), ("ar", 1), ("mdlm", 1), ("eso", 64)}
    assert all(finite(c["seconds"]) and finite(c["tokens_per_s"]) and c["nfe"] > 0 for c in sampling["cases"])
    assert len(sampling["ratios"]) == 2 and all(finite(r["mdlm_over_eso"]) for r in sampling["ratios"])

    (export,) = report["export"]["cases"]
    assert all(finite(export[key]) for key in ("export_vs_training_max", "export_vs_fp32_mean", "training_vs_fp32_mean"))


def test_a_case_that_fails_or_overruns_stays_inside_its_case(monkeypatch):
    from benchmarks import gpu_check

    def run(case):
        if case["n"] == 0:
            raise RuntimeError("first line of the error\nsecond line")
        if case["n"] == 1:
            time.sleep(60)  # interrupted by the hard stop
        return {"status": "ok"}

    monkeypatch.setattr(gpu_check, "HARD_STOP", 1.0)
    box = gpu_check.TimeBox(3.0)
    with box.hard_stop():
        records = box.run([{"n": n} for n in range(3)], run)
    assert records[0] == {"n": 0, "status": "failed", "reason": "RuntimeError: first line of the error"}
    assert records[1]["status"] == "skipped" and records[1]["reason"].startswith("interrupted: still running at 1")
    assert records[2] == {"n": 2, "status": "skipped", "reason": "time box of 3 s spent"}


def test_a_part_with_a_failed_case_is_failed_and_names_it():
    from benchmarks import gpu_check

    sizes = gpu_check.TINY

    def part(box, sizes, ctx):
        return {"cases": [{"status": "ok"}, {"status": "failed", "reason": "relative error 1e+00 > 0.05"}]}

    entry = gpu_check.run_part("attention", part, sizes, None)
    assert entry["status"] == "failed" and "relative error 1e+00" in entry["reason"]

    def broken(box, sizes, ctx):
        raise ValueError("no device\nmore")

    assert gpu_check.run_part("export", broken, sizes, None)["reason"] == "ValueError: no device"
