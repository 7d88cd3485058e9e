"""vLLM integration: the load format `blob2gpu` (``vllm serve MODEL --load-format blob2gpu``).

vLLM finds register() through the `vllm.general_plugins` entry point of this package and calls it
in every process it starts (API server, engine core, workers). Importing this package imports
nothing of vLLM or torch; register() imports the loader only when vLLM calls it. How the load is
configured: options.py; the load itself: model_loader.py.
"""

from __future__ import annotations

LOAD_FORMAT = "blob2gpu"
_registered = False


def register() -> None:
    """Register the load format `blob2gpu` with vLLM's model loader registry (vLLM's plugin entry
    point; once per process). Raises ImportError when vLLM is not installed."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from blob2gpu.integrations.vllm.model_loader import Blob2GpuModelLoader

    register_model_loader(LOAD_FORMAT)(Blob2GpuModelLoader)
    _registered = True
