"""The kernels/ folder is the package esolm_dist.kernels: in a built wheel, in a source checkout on
PYTHONPATH, and nowhere as a top-level ``kernels`` (an unrelated PyPI package has that name); the
inference side imports with plain torch."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_readme import _copy_working_tree

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "import esolm_dist.kernels.attention as a, esolm_dist.kernels.fused, esolm_dist.kernels.flex_masks; "


def _kernels_file(python_path: Path, cwd: Path) -> Path:
    """Where ``esolm_dist.kernels.attention`` is imported from with only python_path on the path."""
    run = subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                          + IMPORT + "print(a.__file__)", str(python_path)],
                         cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return Path(run.stdout.strip())


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree (tracked and untracked files): stale build/ output cannot leak in."""
    pytest.importorskip("setuptools")
    copy = tmp_path_factory.mktemp("checkout") / "esolm-dist"
    _copy_working_tree(copy)
    return copy


def test_wheel_holds_every_module_under_esolm_dist_and_imports_its_own_kernels(checkout, tmp_path):
    """Bugs caught: kernels/ missing from the wheel or shipped as a top-level package (package-dir
    not set), a new subpackage left out of pyproject.toml's explicit package list."""
    out = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                            "-q", "-w", str(out), str(checkout)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = out.glob("esolm_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {f"esolm_dist/{p.relative_to(checkout / 'esolm_dist').as_posix()}"
                for p in (checkout / "esolm_dist").rglob("*.py")}
    expected |= {f"esolm_dist/kernels/{p.relative_to(checkout / 'kernels').as_posix()}"
                 for p in (checkout / "kernels").rglob("*.py")}
    assert "esolm_dist/kernels/attention.py" in expected  # the walk above saw the kernels
    assert sorted(expected - names) == []
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"esolm_dist"}

    installed = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(installed)
    # imported from elsewhere than the checkout: the wheel's own esolm_dist/kernels, not ../kernels
    assert _kernels_file(installed, tmp_path) == installed / "esolm_dist" / "kernels" / "attention.py"


def test_source_checkout_on_the_path_imports_its_own_kernels(checkout, tmp_path):
    """Bug caught: a checkout on PYTHONPATH running the kernels of the installed esolm-dist (or none)."""
    assert _kernels_file(checkout, tmp_path) == checkout / "kernels" / "attention.py"


def test_inference_and_kernels_import_with_plain_torch():
    """The export loads without megatron-core or DeepSpeed (README), though it shares the training
    model's rotary and the kernels. Bug caught: a shared module importing megatron-core."""
    code = ("import sys, esolm_dist.inference.model, esolm_dist.inference.cli, esolm_dist.eso.sampling, "
            "esolm_dist.kernels.attention, esolm_dist.kernels.fused\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'megatron', 'deepspeed'}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
