"""Start the process group (torchrun, SLURM or a single process) and megatron-core's parallel groups."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from esolm_dist.config import ConfigError, ParallelConfig

T = TypeVar("T")
SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory comm op for CPU, JIT-built on its first use


@dataclass(frozen=True)
class Topology:
    """Where this process sits: global rank and its coordinates in the TP x PP x DP grid."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @classmethod
    def single_process(cls, device: torch.device) -> Topology:
        return cls(rank=0, world_size=1, local_rank=0, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, dp_rank=0,
                   dp_size=1, device=device)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that logs: DP rank 0, TP rank 0, on the last stage (it holds the loss)."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.is_last_stage


def launch_env() -> dict[str, int]:
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun, or from SLURM when one task runs per process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env = {"rank": int(os.environ["SLURM_PROCID"]), "world_size": int(os.environ["SLURM_NTASKS"]),
               "local_rank": int(os.environ.get("SLURM_LOCALID", 0))}
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError("SLURM launch without torchrun needs MASTER_ADDR and MASTER_PORT set by the batch "
                              "script (see slurm/train_1b.sh)")
        return env
    return {"rank": 0, "world_size": 1, "local_rank": 0}


def resolve_device(pcfg: ParallelConfig, local_rank: int) -> torch.device:
    if pcfg.device == "cuda" or (pcfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device=cuda but no CUDA device is visible; use parallel.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def configure_tf32(pcfg: ParallelConfig, device: torch.device) -> None:
    """On GPU, let fp32 matmuls (and cuDNN) use TF32 tensor cores unless parallel.tf32=false; the CPU
    has no TF32 and keeps torch's settings."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = pcfg.tf32
        torch.backends.cudnn.allow_tf32 = pcfg.tf32


def check_layout(pcfg: ParallelConfig, world_size: int) -> int:
    """The data-parallel size, or a one-line error when TP x PP does not divide the world size."""
    model_parallel = pcfg.tensor * pcfg.pipeline
    if world_size % model_parallel != 0:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = "
                          f"{pcfg.tensor} x {pcfg.pipeline}; launch TP x PP x DP processes")
    return world_size // model_parallel


def pin_extensions_dir() -> str:
    """Give DeepSpeed's JIT-built ops one build folder per (Python environment, ninja binary).

    Without it they land in torch's shared ~/.cache/torch_extensions/py311_cpu, and processes that
    find another ``ninja`` on PATH (the venv's 1.13 when it is activated, /usr/bin's 1.11 when not)
    disagree about the build log's command hashes and rebuild the op every time they alternate
    (~2 minutes of compiling on a 2-core machine, at start-up). A TORCH_EXTENSIONS_DIR set by the
    user is kept.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        ninja = os.path.realpath(shutil.which("ninja") or "no-ninja")
        key = hashlib.sha1(f"{sys.prefix}|{ninja}".encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.expanduser(f"~/.cache/torch_extensions/esolm-{key}")
    return os.environ["TORCH_EXTENSIONS_DIR"]


def announce_jit_build(extensions_dir: str, op: str = SHM_OP, what: str = "CPU communication op") -> None:
    """DeepSpeed compiles an op the first time it is used in an environment (the CPU comm op in
    deepspeed.init_distributed, CPU Adam for ZeRO-Offload), 2-3 minutes on 2 cores, silently: say so
    before it starts."""
    import deepspeed.ops

    built = Path(extensions_dir) / op / f"{op}.so"
    if deepspeed.ops.__compatible_ops__.get(op) and not built.is_file():
        print(f"esolm-dist: building DeepSpeed's {what} once, into {extensions_dir} "
              "(about 2-3 min on 2 cores)...", file=sys.stderr, flush=True)


def init_parallel(pcfg: ParallelConfig) -> Topology:
    """Initialise torch.distributed and megatron-core's TP/PP/DP groups; idempotent for the same layout
    (another layout needs :func:`reset_model_parallel` first)."""
    env = launch_env()
    device = resolve_device(pcfg, env["local_rank"])
    configure_tf32(pcfg, device)
    if device.type == "cpu":  # also on a machine with GPUs when parallel.device=cpu
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from esolm_dist.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    dp_size = check_layout(pcfg, env["world_size"])
    if not dist.is_initialized():
        backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        rendezvous = {"init_method": "env://"}
        if env["world_size"] == 1 and "MASTER_PORT" not in os.environ:
            # One process on its own: an in-process store (no listening socket) that leaves
            # os.environ alone, so the processes it starts never inherit a port or rank meant for it.
            rendezvous = {"store": dist.HashStore()}
        else:
            # DeepSpeed reads these when it wires itself to our process group (SLURM sets none).
            os.environ.update(RANK=str(env["rank"]), WORLD_SIZE=str(env["world_size"]))
        dist.init_process_group(backend=backend, rank=env["rank"], world_size=env["world_size"],
                                timeout=datetime.timedelta(minutes=30), **rendezvous)
    os.environ["LOCAL_RANK"] = str(env["local_rank"])  # DeepSpeed's engine needs it even in one process
    extensions_dir = pin_extensions_dir()  # before DeepSpeed's comm loads its JIT-built shared-memory op
    if device.type == "cpu" and env["local_rank"] == 0:
        announce_jit_build(extensions_dir)
    import deepspeed

    # DeepSpeed's comm over our process group (never MPI discovery)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, auto_mpi_discovery=False)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=pcfg.tensor,
                                     pipeline_model_parallel_size=pcfg.pipeline)
    current = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if current != (pcfg.tensor, pcfg.pipeline):
        raise RuntimeError(f"megatron-core's groups are already set up for TP x PP = {current[0]} x {current[1]}, "
                           f"not {pcfg.tensor} x {pcfg.pipeline}; call reset_model_parallel() before switching "
                           "layouts in one process")
    return Topology(
        rank=env["rank"], world_size=env["world_size"], local_rank=env["local_rank"],
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=pcfg.tensor,
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pcfg.pipeline,
        dp_rank=ps.get_data_parallel_rank(), dp_size=dp_size, device=device,
    )


def decided_on_rank0(topo: Topology, decide: Callable[[], T]) -> T:
    """Run ``decide()`` on global rank 0 and hand its result to every rank; an exception it raises is
    raised on every rank, so all stop together instead of waiting in the next collective."""
    outcome = [None, None]
    if topo.rank == 0:
        try:
            outcome[0] = decide()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank just below
            outcome[1] = exc
    if topo.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def reset_model_parallel() -> None:
    """Forget megatron-core's TP/PP/DP groups but keep the process group, so that the next
    ``init_parallel`` can set up another layout in the same processes (the test driver runs
    several layouts per launch). Models built under the old layout must not be used after it."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()

