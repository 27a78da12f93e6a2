"""bf16 numerics (parallel.precision=bf16), with torchrun on CPU + gloo, for real (tests/bf16_driver.py).

Gradients accumulate across micro-batches and reduce across DP ranks in fp32 in every ZeRO stage
bf16 allows (ZeRO-0 is refused by the config): one SGD step over 64 micro-batches per rank of a
gradient of 2^-10 next to one of 1, which a bf16 accumulator or a bf16 reduction loses.
Measured: fp32 accumulation and reduction give the hand-computed mean exactly; DeepSpeed's default
(bf16 accumulation) gives 0.0078125 at ZeRO-2/3 and 0.0083 at ZeRO-1 instead of 0.0087814; fp32
accumulation with a bf16 reduction 0.0087891 (ZeRO-1) / 0.0087738 (ZeRO-2/3).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bf16_driver import MICRO_BATCHES, SMALL  # noqa: E402
from test_parallel import launch_env  # noqa: E402

DP = 2


def launch(mode: str, out: Path, *args: str, world_size: int = DP) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
               str(HERE / "bf16_driver.py"), mode, str(out), *args]
    proc = subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_gradients_accumulate_and_reduce_in_fp32(tmp_path, zero_stage):
    launch("accumulation", tmp_path, "--zero-stage", str(zero_stage))
    result = json.loads((tmp_path / f"accumulation_zero{zero_stage}.json").read_text())
    count = MICRO_BATCHES * DP
    expected = -(1.0 + (count - 1) * SMALL) / count  # SGD, lr 1, from 0: minus the mean gradient
    assert result["dp_size"] == DP
    for value in result["master"]:
        assert value == pytest.approx(expected, rel=1e-6), (
            f"ZeRO-{zero_stage} ({result['optimizer']}): the step moved the master by {value}, not {expected}: "
            "gradients were accumulated or reduced in bf16")
