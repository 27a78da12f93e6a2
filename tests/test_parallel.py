"""Every parallel layout trains like one process, with torchrun on CPU + gloo, for real.

tests/parallel_driver.py is launched three times (world size 1, 2 and 4); each launch trains a
tiny Eso-LM for 4 steps (fp32, clipping on, EMA on) in every layout of its world size and writes
the per-step losses and the consolidated final weights. Each layout is compared with the
single-process run that computes the same global batches (see the driver's docstring).
Two layouts start from the single-process run's checkpoint (train.init_from) instead.

Tolerances (fp32, 4 AdamW steps at lr 3e-3, measured on the 2-core CPU box):
- loss per step: relative 1e-6 (measured: bitwise equal in every layout started from scratch,
  <= 6.3e-8 in TP2xPP2 started from the checkpoint);
- gradient norm: relative 1e-6 (measured <= 6.6e-8);
- weights and EMA weights, per tensor: ||a - b|| / ||b|| <= 1e-5 (measured <= 1.9e-6, TP2xPP2 from
  the checkpoint); elementwise |a - b| <= 2e-5 (measured <= 1.4e-5, a handful of embedding entries
  in the same run; <= 9.4e-6 in the layouts started from scratch).
  Reductions happen in another order (TP all-reduce of partial sums, DP averaging, ZeRO's
  reduce-scatter), so gradients differ at ~1e-7 relative; Adam divides each gradient by its own
  RMS, so an entry whose gradient nearly cancels (a rare token's embedding) can move by up to
  ~lr x (its relative rounding error): ~1e-5 absolute here, ~1e-7 everywhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from parallel_driver import LAYOUTS  # noqa: E402

LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-6
WEIGHT_REL_NORM = 1e-5
WEIGHT_ABS = 2e-5
LAUNCH_TIMEOUT_S = 420


def launch_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    # one thread per process: the launches are comparable and 2-4 processes do not oversubscribe 2 cores
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    return env


def launch_driver(world_size: int, out: Path, shard_dir: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, float]:
    driver = [str(HERE / "parallel_driver.py"), str(out), "--shard-dir", str(shard_dir), *extra]
    if world_size == 1:
        command = [sys.executable, *driver]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(world_size), *driver]
    start = time.perf_counter()
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.fixture(scope="module")
def results(tmp_path_factory, shard_dir):
    """Run the three launches once; {world size: (return code, log tail)} plus the output folder."""
    out = tmp_path_factory.mktemp("parallel")
    launches = {}
    for world_size in (1, 2, 4):  # world size 1 first: it builds the shards
        code, log, seconds = launch_driver(world_size, out, shard_dir)
        launches[world_size] = (code, log[-6000:])
        print(f"parallel_driver world size {world_size}: exit {code} in {seconds:.0f} s")
    return out, launches


def load(out: Path, name: str) -> tuple[dict, dict]:
    return json.loads((out / f"{name}.json").read_text()), torch.load(out / f"{name}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_recompute", "dp2_zero1", "dp2_zero2", "dp2_zero3", "tp2_dp2_zero1",
                                    "tp2_pp2_zero1", "tp2_pp2_from_single"])
def test_layout_matches_single_process(results, layout):
    out, launches = results
    world_size = LAYOUTS[layout].world_size
    for needed in (1, world_size):
        code, log = launches[needed]
        assert code == 0, f"driver at world size {needed} failed (exit {code}):\n{log}"
    got, got_weights = load(out, layout)
    ref, ref_weights = load(out, got["reference"])

    assert got["steps"] == ref["steps"] == [1, 2, 3, 4]
    for step, a, b in zip(got["steps"], got["loss"], ref["loss"], strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"{layout} step {step}: loss {a} vs single process {b}"
    for step, a, b in zip(got["steps"], got["grad_norm"], ref["grad_norm"], strict=True):
        assert a == pytest.approx(b, rel=GRAD_NORM_RTOL), f"{layout} step {step}: grad norm {a} vs {b}"
    assert got["same_weights_on_all_ranks"], f"{layout}: ranks consolidated different weights"

    for kind in ("params", "ema"):
        a_all, b_all = got_weights[kind], ref_weights[kind]
        assert a_all.keys() == b_all.keys(), f"{layout} {kind}: names differ"
        for name, b in b_all.items():
            a = a_all[name]
            assert a.shape == b.shape and a.dtype == torch.float32, f"{layout} {kind} {name}: {a.shape} vs {b.shape}"
            rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
            worst = float((a - b).abs().max())
            assert rel <= WEIGHT_REL_NORM and worst <= WEIGHT_ABS, (
                f"{layout} {kind} {name}: relative norm difference {rel:.2e}, max |difference| {worst:.2e}")
    # the weights moved: a comparison of untrained weights would prove little
    moved = max(float((ref_weights["params"][n] - ref_weights["ema"][n]).abs().max()) for n in ref_weights["params"])
    assert moved > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single_from_single", "tp2_pp2_from_single"])
def test_init_from_a_checkpoint_starts_from_its_weights_in_any_layout(results, layout):
    """train.init_from: a new run (one process, or TP=2 x PP=2) starts from exactly the weights the
    single-process run's checkpoint holds; the TP=2 x PP=2 run then trains like one process
    (test_layout_matches_single_process[tp2_pp2_from_single])."""
    out, launches = results
    assert launches[1][0] == 0 and launches[LAYOUTS[layout].world_size][0] == 0
    got, got_weights = load(out, layout)
    _, source = load(out, "single")
    initial = got_weights["initial"]
    assert initial.keys() == source["params"].keys()
    for name, expected in source["params"].items():
        assert torch.equal(initial[name], expected), f"{layout}: {name} is not the checkpoint's"
    assert got["steps"] == [1, 2, 3, 4]  # a new run: its own step count, optimizer and MLflow run
    assert got["mlflow_run_id"] != load(out, "single")[0]["mlflow_run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "tp2", "pp2", "dp2_zero1", "dp2_zero3", "tp2_dp2_zero1", "tp2_pp2_zero1"])
def test_sample_weights_are_gathered_to_the_logging_rank_only(results, layout):
    """consolidate.full_state_dict_on (text samples at evaluation): the logging rank (TP 0, DP 0, last
    stage) receives the full weights, equal to full_state_dict's; every other rank gets None."""
    out, launches = results
    assert launches[LAYOUTS[layout].world_size][0] == 0
    got, _ = load(out, layout)
    for rank, (holds, equal) in enumerate(got["gathered_by_rank"]):
        assert holds == (rank == got["logging_rank"]), f"{layout}: rank {rank} holds the gathered weights: {holds}"
        assert equal == holds, f"{layout}: rank {rank} gathered other weights than full_state_dict"


# ---- layouts that must fail at start-up, with one line that says why ------------------------------
def run_main(monkeypatch, capsys, world_size: int, *overrides: str) -> tuple[int, str]:
    from esolm_dist import train

    # torchrun's variables, as rank 0 of a launch of world_size processes would see them; every check
    # below must happen before a process group is formed (which would wait for the other ranks), so
    # forming one fails the test
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", "0")

    def too_late(_cfg):
        raise AssertionError("the layout error came after the process group was formed")

    monkeypatch.setattr(train, "init_parallel", too_late)
    code = train.main(["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
                       "train.run_dir=/nonexistent/never-created", *overrides])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("world_size, overrides, message", [
    (3, ["parallel.tensor=2"],
     "world size 3 is not a multiple of parallel.tensor x parallel.pipeline = 2 x 1"),
    (2, ["train.global_batch_size=4", "train.micro_batch_size=4"],
     "train.global_batch_size (4) must equal train.micro_batch_size (4) x gradient accumulation x data-parallel "
     "size (2)"),
    (4, ["train.global_batch_size=12", "train.micro_batch_size=4", "parallel.tensor=2"],
     "train.global_batch_size (12) must equal train.micro_batch_size (4) x gradient accumulation x data-parallel "
     "size (2)"),
    (4, ["parallel.tensor=4"], "model.num_heads (2) must be divisible by parallel.tensor (4)"),
    (2, ["parallel.tensor=2", "model.ffn_hidden_size=129"],
     "model.hidden_size (32) and the FFN size (129) must be divisible by parallel.tensor (2)"),
    (3, ["parallel.pipeline=3"], "model.num_layers (2) must be divisible by parallel.pipeline (3)"),
    (2, ["parallel.pipeline=2", "parallel.zero_stage=2"],
     "parallel.zero_stage=2 cannot be combined with parallel.pipeline=2"),
])
def test_invalid_layout_fails_at_start_up(monkeypatch, capsys, world_size, overrides, message):
    code, err = run_main(monkeypatch, capsys, world_size, *overrides)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("esolm-train: error: "), err
    assert message in err, err
    assert not Path("/nonexistent/never-created").exists()


@pytest.mark.slow
def test_tp2_pp2_checkpoint_exports_the_single_process_weights(results, tmp_path):
    """Export parity: the TP=2 x PP=2 checkpoint (per-layer, per-TP-rank files) exports to the
    reference layout; its logits equal the checkpoint network's, its weights the single-process run's."""
    from esolm_dist.convert import export
    from esolm_dist.inference.export_io import read_export
    from esolm_dist.weight_layout import to_reference_layout

    out, launches = results
    assert launches[4][0] == 0 and launches[1][0] == 0
    path = export(out / "tp2_pp2_zero1" / "checkpoints" / "latest", tmp_path / "export", verify=True)
    exported = read_export(path).state_dict
    _, ref_weights = load(out, "single")
    expected = to_reference_layout(ref_weights["params"], num_heads=2)
    assert exported.keys() == expected.keys()
    for name, b in expected.items():
        assert float((exported[name] - b).abs().max()) <= WEIGHT_ABS, name


@pytest.mark.slow
def test_zero3_checkpoint_exports_its_weights(results, tmp_path):
    """A ZeRO-3 checkpoint keeps its weights in DP-partitioned optimizer files; the export merges them,
    live and EMA, into the weights the run itself consolidated."""
    from esolm_dist.convert import export
    from esolm_dist.inference.export_io import read_export
    from esolm_dist.weight_layout import to_reference_layout

    out, launches = results
    assert launches[2][0] == 0
    _, weights = load(out, "dp2_zero3")
    for use_ema, kind in ((False, "params"), (True, "ema")):
        path = export(out / "dp2_zero3" / "checkpoints" / "latest", tmp_path / kind, use_ema=use_ema,
                      verify=not use_ema)
        exported = read_export(path).state_dict
        for name, expected in to_reference_layout(weights[kind], num_heads=2).items():
            assert torch.equal(exported[name], expected), f"{kind} {name}"


@pytest.mark.slow
def test_every_layouts_checkpoint_files_load_weights_only(results):
    """Bug caught: a file DeepSpeed writes in some layout (pipeline layer files, ZeRO-1/2/3 optimizer
    partitions) needing a pickled class outside esolm_dist.safe_load's allowlist:
    resume and export would then refuse checkpoints that esolm-train itself wrote."""
    from esolm_dist.safe_load import load_file

    out, launches = results
    assert all(code == 0 for code, _ in launches.values())
    files = sorted(out.glob("*/checkpoints/step_*/*.pt"))
    layouts = {path.parents[2].name for path in files}
    assert {"pp2", "dp2_zero1", "dp2_zero2", "dp2_zero3", "tp2_pp2_zero1"} <= layouts, layouts
    for path in files:
        assert isinstance(load_file(path), dict), path
