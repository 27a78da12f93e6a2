"""A checkpoint written in one parallel layout resumes in another, for real (torchrun, CPU + gloo).

tests/resume_layouts_driver.py is launched four times (world size 1, 2, 4, then 1 again for the run
that resumes a world-size-2 checkpoint on one process). The issue's four layout changes:

    DP2 ZeRO-2 -> TP2;  TP2 x PP2 (ZeRO-1) -> DP4 ZeRO-1;  PP2 -> one process;  one process -> DP2 ZeRO-3

and one into a pipeline: one process -> TP2 x PP2 (ZeRO-1).

Each source trains 2 steps and saves; its resume trains steps 3-4. Checked:
- right after the resume, the new layout's consolidated weights, EMA weights, fp32 master weights and
  Adam moments equal the source's at its save bit for bit, and so do the step, the learning rate, Adam's
  step and DeepSpeed's step counter (the source and the target are read off the live engines, each in
  its own layout, by esolm_dist.parallel.consolidate and DeepSpeed's safe_get_full_* API);
- steps 3-4 match the uninterrupted single-process reference (steps 1-2 on the source's global batches
  and noise, 3-4 on the target's; the driver's docstring says why a resume across DP sizes restarts
  the data stream for now) within tests/test_parallel.py's tolerances: losses and gradient norms rel
  1e-6, weights and EMA per tensor ||a - b|| / ||b|| <= 1e-5 and |a - b| <= 2e-5;
- the resume says in one line from which layout to which.
Warmup lasts 4 steps, so the LR schedule's position matters at step 3.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from resume_layouts_driver import CASES, RUNS  # noqa: E402
from test_parallel import GRAD_NORM_RTOL, LOSS_RTOL, WEIGHT_ABS, WEIGHT_REL_NORM, launch_env  # noqa: E402

LAUNCH_TIMEOUT_S = 420
TENSOR_KINDS = ("params", "ema", "master", "exp_avg", "exp_avg_sq")
MESSAGES = {
    "tp2_from_dp2_zero2": "TP1 x PP1 x DP2 (ZeRO-2) in TP2 x PP1 x DP1 (ZeRO-0)",
    "dp4_zero1_from_tp2_pp2_zero1": "TP2 x PP2 x DP1 (ZeRO-1) in TP1 x PP1 x DP4 (ZeRO-1)",
    "single_from_pp2": "TP1 x PP2 x DP1 (ZeRO-0) in TP1 x PP1 x DP1 (ZeRO-0)",
    "dp2_zero3_from_single": "TP1 x PP1 x DP1 (ZeRO-0) in TP1 x PP1 x DP2 (ZeRO-3)",
    "tp2_pp2_zero1_from_single": "TP1 x PP1 x DP1 (ZeRO-0) in TP2 x PP2 x DP1 (ZeRO-1)",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, shard_dir):
    out = tmp_path_factory.mktemp("resume_layouts")
    driver = [str(HERE / "resume_layouts_driver.py"), str(out), "--shard-dir", str(shard_dir)]
    logs = {}
    for key, world_size, phase in (("1", 1, "first"), ("2", 2, None), ("4", 4, None), ("1-last", 1, "last")):
        if world_size == 1:
            command = [sys.executable, *driver, "--phase", phase]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(world_size), *driver]
        start = time.perf_counter()
        proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        logs[key] = (proc.returncode, proc.stdout + proc.stderr)
        print(f"resume_layouts_driver launch {key}: exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
    return out, logs


def _launch_of(name: str) -> str:
    run = RUNS[name]
    return "1-last" if run.world_size == 1 and run.phase == "last" else str(run.world_size)


def load(out: Path, name: str, logs: dict) -> tuple[dict, dict]:
    code, log = logs[_launch_of(name)]
    assert code == 0, f"the launch running {name} failed (exit {code}):\n{log[-6000:]}"
    return json.loads((out / f"{name}.json").read_text()), torch.load(out / f"{name}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_in_another_layout_restores_the_saved_state_exactly(results, case):
    out, logs = results
    got, got_tensors = load(out, case, logs)
    source, source_tensors = load(out, RUNS[case].resume_from, logs)
    resumed, saved = got["resumed"], source["end"]
    assert resumed["step"] == saved["step"] == 2
    assert resumed["lr"] == saved["lr"] == pytest.approx(3e-3 * 3 / 4, rel=1e-12)  # warmup 4: step 3 runs at 3/4
    assert resumed["adam_steps"] == saved["adam_steps"] == [2.0]
    assert resumed["global_steps"] == saved["global_steps"] == 2
    for kind in TENSOR_KINDS:
        a_all, b_all = got_tensors["resumed"][kind], source_tensors["end"][kind]
        assert a_all.keys() == b_all.keys(), f"{case} {kind}: names differ"
        for name, b in b_all.items():
            assert torch.equal(a_all[name], b), f"{case} {kind} {name}: not the saved values"
    # the moments are a real state to restore, not zeros
    assert min(float(t.abs().max()) for t in source_tensors["end"]["exp_avg_sq"].values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_continues_like_the_uninterrupted_run(results, case):
    out, logs = results
    got, got_tensors = load(out, case, logs)
    ref, ref_tensors = load(out, CASES[case], logs)
    assert got["steps"] == ref["steps"] == [3, 4]
    for step, a, b in zip(got["steps"], got["loss"], ref["loss"], strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"{case} step {step}: loss {a} vs uninterrupted {b}"
    for step, a, b in zip(got["steps"], got["grad_norm"], ref["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=GRAD_NORM_RTOL), f"{case} step {step}: grad norm {a} vs {b}"
    assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
    for kind in ("params", "ema"):
        for name, b in ref_tensors["end"][kind].items():
            a = got_tensors["end"][kind][name]
            rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
            worst = float((a - b).abs().max())
            assert rel <= WEIGHT_REL_NORM and worst <= WEIGHT_ABS, (
                f"{case} {kind} {name}: relative norm difference {rel:.2e}, max |difference| {worst:.2e}")
    moved = max(float((ref_tensors["end"]["params"][n] - ref_tensors["resumed"]["params"][n]).abs().max())
                for n in ref_tensors["end"]["params"])
    assert moved > 1e-3  # steps 3-4 changed the weights: the comparison says something


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_layout_change_is_said_in_one_line(results, case):
    out, logs = results
    load(out, case, logs)
    line = f"esolm-train: resuming step 2 written with {MESSAGES[case]}: weights, optimizer state and EMA resharded"
    assert logs[_launch_of(case)][1].splitlines().count(line) == 1, line


@pytest.mark.slow
def test_same_layout_resume_is_not_resharded(results):
    """The references resume in their own layout: DeepSpeed's own load, no layout line."""
    out, logs = results
    load(out, "ref_single_then_single", logs)
    assert "resharded" not in logs["1"][1]


@pytest.mark.slow
def test_zero0_checkpoint_without_parameter_names_is_refused_in_one_line(results, tmp_path):
    """ZeRO-0 keeps torch's optimizer state by position only: without the names esolm-train now stores
    in rank_XXXXX.pt, a layout change must refuse, naming the file and the way out."""
    from esolm_dist.checkpoint import CheckpointError, read_meta
    from esolm_dist.optimizer_state_reader import read_optimizer_state

    out, logs = results
    load(out, "pp2", logs)
    step = tmp_path / "step_00000002"
    shutil.copytree(out / "pp2" / "checkpoints" / "step_00000002", step)
    rank_file = step / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=True)
    del state["optimizer_parameters"]
    torch.save(state, rank_file)
    with pytest.raises(CheckpointError) as error:
        read_optimizer_state(step, read_meta(step))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(rank_file) in message and "train.init_from" in message


def test_zero3_partition_is_the_inverse_of_unpartition():
    """Each DP rank's flat slice of a tensor whose size does not divide: hand-computed pieces."""
    from esolm_dist.weight_layout import unpartition_zero3, zero3_partition

    full = torch.arange(10.0).view(2, 5)
    parts = [zero3_partition(full, rank, 4) for rank in range(4)]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 0]]
    assert torch.equal(unpartition_zero3(parts, full.shape), full)


def test_reseed_depends_on_seed_step_and_dp_rank():
    from esolm_dist.checkpoint import reseed

    def draw(seed, step, dp_rank):
        reseed(seed, step, dp_rank)
        return torch.rand(3)

    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    assert not torch.equal(draw(1, 5, 0), draw(1, 5, 1))
    assert not torch.equal(draw(1, 5, 0), draw(1, 6, 0))
    assert not torch.equal(draw(1, 5, 0), draw(2, 5, 0))
