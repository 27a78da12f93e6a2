"""What depends on the device: the chosen one (parallel.device), never on whether CUDA merely exists."""

import pytest
import torch

from esolm_dist.config import ConfigError, ParallelConfig, load_config
from esolm_dist.parallel import cpu_compat


@pytest.fixture()
def cuda_present(monkeypatch):
    """A machine with GPUs, as far as "is CUDA available" goes (nothing may really use CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cpu_patches_apply_on_a_gpu_machine_when_training_on_cpu(single_process, cuda_present, monkeypatch):
    from esolm_dist.parallel.state import init_parallel

    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # what a GPU machine answers
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("synchronize reached CUDA"))
    topo = init_parallel(ParallelConfig(device="cpu"))
    assert topo.device == torch.device("cpu")
    # megatron-core's buffers (torch.cuda.current_device()) now land on the CPU, and syncs are no-ops
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()


def test_checkpoint_rng_state_skips_cuda_unless_this_process_uses_it(cuda_present, monkeypatch):
    from esolm_dist import checkpoint

    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: pytest.fail("read the CUDA RNG"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a, **k: pytest.fail("wrote the CUDA RNG"))
    state = checkpoint.rng_state()
    assert "cuda" not in state
    checkpoint.set_rng_state({**state, "cuda": torch.zeros(4, dtype=torch.uint8)})  # a GPU run's checkpoint


def test_offload_pins_host_memory_only_for_a_gpu(cuda_present):
    from esolm_dist.parallel.engine import deepspeed_config

    cfg = load_config(None, ["parallel.zero_stage=2", "parallel.cpu_offload=true"])
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda", 0), True)):
        offload = deepspeed_config(cfg, 1, device)["zero_optimization"]["offload_optimizer"]
        assert offload == {"device": "cpu", "pin_memory": pinned}


@pytest.fixture()
def tf32_flags_restored():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_follows_the_config_on_gpu_and_leaves_the_cpu_alone(tf32_flags_restored):
    from esolm_dist.parallel.state import configure_tf32

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    configure_tf32(ParallelConfig(tf32=True), torch.device("cpu"))
    assert not torch.backends.cuda.matmul.allow_tf32
    configure_tf32(ParallelConfig(tf32=True), torch.device("cuda", 0))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    configure_tf32(ParallelConfig(tf32=False), torch.device("cuda", 0))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_tf32_key_is_validated():
    assert load_config(None, ["parallel.tf32=false"]).parallel.tf32 is False
    with pytest.raises(ConfigError, match="parallel.tf32"):
        load_config(None, ["parallel.tf32=sometimes"])
