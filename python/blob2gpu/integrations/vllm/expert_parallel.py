"""Expert parallelism in vLLM: which of a checkpoint's expert tensors this worker owns, as vLLM's
own default loader decides it, so that a worker never fetches another worker's experts.

With ``--enable-expert-parallel`` each worker of an MoE model holds only its share of the routed
experts (the expert-parallel group spans data, prefill-context and tensor parallelism); with
``--enable-ep-weight-filter`` as well, vLLM's default loader skips the per-expert tensors of the
other workers before reading a byte of them (vllm/model_executor/model_loader/ep_weight_filter.py;
experts are most of an MoE model's bytes). The load format blob2gpu skips the same tensors as a
tensor selection, so their bytes are never fetched: the per-expert weights
(``...experts.<id>...weight``) of experts this worker does not own. Everything else is read:
dense tensors, shared experts, per-expert scales, and fused 3D expert tensors (no expert id in
their names: the model's loader slices them).

Both decisions are vLLM's code, asked rather than copied: which experts are this worker's
(``DefaultModelLoader._init_ep_weight_filter``: the flag, EPLB, the expert count, the EP size
and rank, the placement strategy) and which names are another worker's (``should_skip_weight``).
vLLM added them in March 2026 (its PRs 37136 and 37351; 0.32 has both). An older vLLM's own
loader reads every expert, and so does blob2gpu there. vLLM's internals are reached from this
module only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

log = init_logger("vllm.blob2gpu")

WITHOUT_FILTER = (
    "every worker reads every expert's tensors (as this vLLM's own loader does); vLLM's EP "
    "weight filter (vllm.model_executor.model_loader.ep_weight_filter, from March 2026; 0.32 "
    "has it) lets each read only its own"
)


@dataclass(frozen=True)
class OwnedExperts:
    """The experts this worker owns under expert parallelism: `local` (expert ids) of `total`,
    and vLLM's rule for which checkpoint names belong to another worker (`skips(name, local)`)."""

    local: frozenset[int]
    total: int
    skips: Callable[[str, set[int]], bool]

    def keeps(self, name: str) -> bool:
        """False for a per-expert weight of an expert another worker owns, True otherwise."""
        return not self.skips(name, set(self.local))

    def __str__(self) -> str:
        """'experts 4-7 of 8', or 'experts 1, 3, 5, 7 of 8' (round-robin placement)."""
        ids = sorted(self.local)
        if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
            said = f"{ids[0]}-{ids[-1]}"
        else:
            said = ", ".join(map(str, ids))
        return f"experts {said} of {self.total}"


def owned_experts(model_config: Any) -> OwnedExperts | None:
    """This worker's experts, as vLLM's default loader decides them for its own EP weight
    filter; None when this worker reads every tensor (no expert parallelism, vLLM's
    `enable_ep_weight_filter` off, EPLB on, a dense model, or a vLLM without the filter:
    logged). Must run where vLLM runs load_weights (its current config and distributed groups
    set)."""
    try:
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight
    except ImportError:
        if expert_parallel_enabled():
            log.info("blob2gpu: this vLLM has no EP weight filter: %s", WITHOUT_FILTER)
        return None
    if not hasattr(DefaultModelLoader, "_init_ep_weight_filter"):
        if expert_parallel_enabled():
            log.warning(
                "blob2gpu: this vLLM's default loader decides expert ownership where blob2gpu "
                "does not look (DefaultModelLoader._init_ep_weight_filter): %s",
                WITHOUT_FILTER,
            )
        return None
    local = local_expert_ids(DefaultModelLoader, model_config)
    if local is None:
        return None
    total = int(model_config.get_num_experts())
    skips: Callable[[str, set[int]], bool] = should_skip_weight
    return OwnedExperts(frozenset(local), total, skips)


def local_expert_ids(default_loader: Any, model_config: Any) -> set[int] | None:
    """The expert ids this worker owns, as vLLM's default loader computes them for its own
    filter (None: it reads every expert)."""
    from vllm.config.load import LoadConfig

    loader = default_loader(LoadConfig())
    loader._init_ep_weight_filter(model_config)
    local = getattr(loader, "local_expert_ids", None)
    return set(local) if local is not None else None


def expert_parallel_enabled() -> bool:
    """Whether this deployment asked for expert parallelism (`--enable-expert-parallel`)."""
    from vllm.config import get_current_vllm_config

    return bool(getattr(get_current_vllm_config().parallel_config, "enable_expert_parallel", False))
