"""Node readiness before rollout (``blob2gpu preflight``): the CUDA driver, the GPUs, pinned
memory, the cache directory, the storage endpoint and its credentials, and whether the model fits.

Each check says ok / warn / fail / skip, a value and a hint. The run fails (exit 1) when any check
fails, so it fits a Kubernetes init container: a broken node is found before users are.
Nothing secret is printed: URIs and error texts pass through ``sources.redact``.
"""

from blob2gpu.operations.preflight.cache import default_cache_dir
from blob2gpu.operations.preflight.result import Check, PreflightResult
from blob2gpu.operations.preflight.run import run_preflight

__all__ = ["Check", "PreflightResult", "default_cache_dir", "run_preflight"]
