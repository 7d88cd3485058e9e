"""The load format `blob2gpu`: a vLLM model loader that streams a checkpoint (Azure Blob, or local
files) through blob2gpu's one load sequence into the worker's device and hands each tensor to the
model's own ``load_weights`` as its shard lands.

The model's weight loaders do the renaming, fusing and tensor-parallel slicing, exactly as with
vLLM's default loader; blob2gpu does the fetching, checking (manifest, etags), caching and
reporting. Tensors are handed out without being kept (Checkpoint.stream), so beyond what the
model's loaders copy into its parameters only the shards in flight are held. With tensor
parallelism the workers of a group share one copy of a Blob checkpoint (the fan-out over vLLM's
tensor-parallel group): each worker fetches a part and copies it into its own memory, and the
group's device communicator (NCCL on GPUs; gloo on the CPU build) broadcasts it into the others'.
With expert parallelism each worker reads only its own experts' tensors, as vLLM's default loader
does (expert_parallel.py); with the fan-out as well, the group fetches once every shard some
worker needs and each keeps its own tensors (those shards are shared whole over the gloo group:
the ranks' tensor groups differ). Any blob2gpu error stops the worker, and so the engine's start,
with the typed error: a failed start, never a wrong model.

LoadReport's mark_first_token() is not wired: vLLM (0.32) reports first tokens only to stat
loggers in the API server process, and the load runs in a worker process (README, "Serving with
vLLM"). The load's metrics (operations/metrics.py) reach vLLM's /metrics in prometheus_client's
multiprocess mode ($PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from blob2gpu.errors import TensorNotFound
from blob2gpu.integrations.distributed import GroupFanOut
from blob2gpu.integrations.vllm.expert_parallel import OwnedExperts, owned_experts
from blob2gpu.integrations.vllm.options import VllmLoadOptions
from blob2gpu.loading.loader import Loader
from blob2gpu.operations.report import LoadReport
from blob2gpu.sources import source_class

# A child of vLLM's logger: its handler and level apply, so the report shows in vLLM's log.
log = init_logger("vllm.blob2gpu")


class Blob2GpuModelLoader(BaseModelLoader):  # type: ignore[misc,unused-ignore]
    """vLLM's `--load-format blob2gpu` (see the module docstring and options.py)."""

    def __init__(self, load_config: LoadConfig) -> None:
        """Raises ConfigError for a bad --model-loader-extra-config."""
        super().__init__(load_config)
        self.options = VllmLoadOptions.from_extra_config(load_config.model_loader_extra_config)
        self.report: LoadReport | None = None  # the last load's, once it finished

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download ahead: the weights stream during load_weights (config and
        tokenizer come from `blob2gpu fetch-aux`)."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Stream the checkpoint into `model` (see the module docstring). Raises the load's
        blob2gpu error, or TensorNotFound when a parameter of the model got no tensor."""
        rank, world, group, device_group = tensor_parallel_group()
        uri = self.options.uri(model_config.model)
        fan_out = world > 1 and self.options.distributed and source_class(uri).remote
        experts = owned_experts(model_config)  # under expert parallelism: this worker's
        with Loader(config=self.options.config, **self.options.settings) as loader:
            request = loader.request(
                uri,
                device=device_of(model),
                framework="torch",
                tensor_filter=wanted_by(model, experts.keeps if experts else None),
            )
            strategy = GroupFanOut(rank, world, group, device_group) if fan_out else None
            with loader.start(request, strategy) as checkpoint:
                loaded = model.load_weights(checkpoint.stream())  # type: ignore[operator]
                # A consumer that stops early leaves shards unread: finish, so every check runs.
                for _ in checkpoint.stream():
                    pass
            report = checkpoint.report
        self.report = report
        if model_config.quantization is None and loaded is not None:
            check_every_parameter_loaded(model, set(loaded), report.uri)
        worker, workers = worker_of_engine()
        publish_report(report, self.options.report_file(worker, workers), rank, fan_out, experts)


def tensor_parallel_group() -> tuple[int, int, Any, Any]:
    """(this worker's rank in its tensor-parallel group, the group's size, its gloo group, its
    device group: NCCL on GPUs, what a GPU target's exchange moves the weights over)."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    return group.rank_in_group, group.world_size, group.cpu_group, group.device_group


def worker_of_engine() -> tuple[int, int]:
    """(this worker's rank among all the engine's workers, their number): what names its report
    file. Data- and pipeline-parallel workers share tensor-parallel ranks, so those would write
    over each other's reports."""
    from vllm.distributed.parallel_state import get_world_group

    group = get_world_group()
    return group.rank_in_group, group.world_size


def device_of(model: nn.Module) -> str:
    """Where the model's parameters live ('cpu' or 'cuda:N'): where the weights stream to."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"


def wanted_by(
    model: nn.Module, keeps_expert: Callable[[str], bool] | None = None
) -> Callable[[str], bool] | None:
    """The names this worker takes: those the model uses, where it says (vLLM's
    is_unused_checkpoint_weight), less the other workers' experts under expert parallelism
    (`keeps_expert`, expert_parallel.py). The others are skipped without reading their bytes;
    None (every tensor) where neither applies."""
    unused = getattr(model, "is_unused_checkpoint_weight", None)
    if unused is None:
        return keeps_expert
    if keeps_expert is None:
        return lambda name: not unused(name)
    return lambda name: keeps_expert(name) and not unused(name)


def check_every_parameter_loaded(model: nn.Module, loaded: set[str], uri: str) -> None:
    """Raises TensorNotFound naming the model's parameters that no checkpoint tensor filled
    (what vLLM's default loader checks for a model without quantization)."""
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        raise TensorNotFound(
            f"'{uri}' has no tensor for the model's parameter(s) "
            + ", ".join(missing[:5])
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            + "; is this the model's checkpoint?"
        )


def publish_report(
    report: LoadReport,
    path: str | None,
    rank: int,
    fan_out: bool,
    experts: OwnedExperts | None = None,
) -> None:
    """Log the report's summary on this worker and write it as JSON to `path` if set."""
    how = "shared with the tensor-parallel group" if fan_out else "from its source"
    if experts is not None:
        how += f", {experts}"
    log.info("blob2gpu load (worker %d, %s): %s", rank, how, report.summary())
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        log.info("blob2gpu load report written to %s", path)
