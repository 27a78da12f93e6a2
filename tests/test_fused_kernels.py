"""NVIDIA apex's fused LayerNorm / FusedAdam: detected by their CUDA extensions (not the PyPI name `apex`),
used only on GPU tensors, and announced at start-up."""

import sys

import pytest
import torch

from esolm_dist.kernels import fused

FAKE_NVIDIA_APEX = {
    "apex/__init__.py": "",
    "apex/normalization/__init__.py": "",
    "apex/normalization/fused_layer_norm.py": (
        "import torch\n"
        "calls = []\n"
        "class FusedLayerNormAffineFunction(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x, weight, bias, shape, eps):\n"
        "        calls.append(shape)\n"
        "        return torch.nn.functional.layer_norm(x, shape, weight, bias, eps)\n"),
    "apex/optimizers/__init__.py": (
        "import torch\n"
        "class FusedAdam(torch.optim.AdamW):\n"
        "    def __init__(self, params, adam_w_mode=False, **kwargs):\n"
        "        self.adam_w_mode = adam_w_mode\n"
        "        super().__init__(params, **kwargs)\n"),
    "fused_layer_norm_cuda.py": "",  # the CUDA extensions NVIDIA apex builds
    "amp_C.py": "",
}


def install(tmp_path, monkeypatch, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        monkeypatch.delitem(sys.modules, module)


@pytest.fixture(autouse=True)
def fresh_detection():
    fused.apex_layer_norm.cache_clear()
    fused.apex_fused_adam.cache_clear()
    yield
    fused.apex_layer_norm.cache_clear()
    fused.apex_fused_adam.cache_clear()
    for module in [m for m in sys.modules if m == "apex" or m.startswith("apex.")]:
        del sys.modules[module]


def test_without_apex_torch_kernels_run_and_the_log_says_so():
    assert fused.apex_layer_norm() is None and fused.apex_fused_adam() is None
    params = [torch.nn.Parameter(torch.zeros(2))]
    adam = fused.adamw(params, torch.device("cuda", 0), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    assert type(adam) is torch.optim.AdamW and adam.defaults["weight_decay"] == 0.1
    assert fused.describe(torch.device("cpu"), adam) == "LayerNorm torch, optimizer AdamW (torch)"
    assert "NVIDIA apex with its CUDA extensions is not installed" in fused.describe(torch.device("cuda", 0), adam)


def test_the_unrelated_pypi_apex_is_not_taken_for_nvidia_apex(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, {"apex/__init__.py": "", "fused_layer_norm_cuda.py": "", "amp_C.py": ""})
    assert fused.apex_layer_norm() is None and fused.apex_fused_adam() is None


def test_nvidia_apex_without_its_cuda_build_is_not_used(tmp_path, monkeypatch):
    files = {k: v for k, v in FAKE_NVIDIA_APEX.items() if k not in ("fused_layer_norm_cuda.py", "amp_C.py")}
    install(tmp_path, monkeypatch, files)
    assert fused.apex_layer_norm() is None and fused.apex_fused_adam() is None


def test_nvidia_apex_serves_gpu_tensors_only(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, FAKE_NVIDIA_APEX)
    assert fused.apex_layer_norm().__name__ == "FusedLayerNormAffineFunction"
    params = [torch.nn.Parameter(torch.zeros(2))]
    gpu_adam = fused.adamw(params, torch.device("cuda", 0), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    assert type(gpu_adam).__name__ == "FusedAdam" and gpu_adam.adam_w_mode  # decoupled weight decay, as AdamW
    assert type(fused.adamw(params, torch.device("cpu"), lr=1e-3, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=0.0)) is torch.optim.AdamW
    assert fused.describe(torch.device("cuda", 0), gpu_adam) == (
        "LayerNorm apex fused (NVIDIA apex), optimizer FusedAdam (apex)")
    norm, x = fused.LayerNorm(4), torch.randn(3, 4)
    assert torch.equal(norm(x), torch.nn.functional.layer_norm(x, (4,), norm.weight, norm.bias, norm.eps))
    assert sys.modules["apex.normalization.fused_layer_norm"].calls == []  # CPU tensors keep torch's kernel


def test_the_engine_announces_its_kernels_and_the_model_uses_the_dispatching_layer_norm(tiny_network, capsys):
    from esolm_dist.config import load_config
    from esolm_dist.model.objective import EsoObjective
    from esolm_dist.parallel.engine import build_engine
    from esolm_dist.parallel.state import Topology

    assert isinstance(tiny_network.blocks[0].ln1, fused.LayerNorm)
    assert isinstance(tiny_network.head.final_ln, fused.LayerNorm)
    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=8"])
    engine = build_engine(EsoObjective(tiny_network, "B", tiny_network.cfg.seq_len), cfg,
                          Topology.single_process(torch.device("cpu")))
    assert "esolm-train: kernels: LayerNorm torch, optimizer AdamW (torch)" in capsys.readouterr().out
    engine.destroy()
