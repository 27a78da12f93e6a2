"""esolm-dist: distributed training, export and KV-cached sampling for Esoteric Language Models."""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _bind_source_kernels() -> None:
    """esolm_dist.kernels is the repository's top-level kernels/ folder (pyproject.toml's package-dir).

    An install maps it (the wheel holds esolm_dist/kernels/); a source checkout used through
    PYTHONPATH has no such mapping, so the checkout's own kernels/ is bound here. Without this
    such a run would import no kernels, or those of whatever esolm-dist is installed.
    """
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (here.parent / "pyproject.toml").is_file():
        return  # installed from a wheel, or not a source checkout (a site-packages kernels/ is not ours)
    name = f"{__name__}.kernels"
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system sets for a subpackage it loads itself


_bind_source_kernels()
