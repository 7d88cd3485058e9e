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

The decisions are vLLM's, through its public parts: which experts are this worker's (the
filter module's ``compute_local_expert_ids`` over the EP size and rank that vLLM's distributed
groups give, under the conditions its default loader applies: the flags, EPLB, the expert count)
and which names are another worker's (``should_skip_weight``).
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
        from vllm.model_executor.model_loader.ep_weight_filter import (
            compute_local_expert_ids,
            should_skip_weight,
        )
    except ImportError:
        if expert_parallel_enabled():
            log.info("blob2gpu: this vLLM has no EP weight filter: %s", WITHOUT_FILTER)
        return None
    local = local_expert_ids(model_config, compute_local_expert_ids)
    if local is None:
        return None
    total = int(model_config.get_num_experts())
    skips: Callable[[str, set[int]], bool] = should_skip_weight
    return OwnedExperts(frozenset(local), total, skips)


def local_expert_ids(model_config: Any, compute: Callable[..., set[int] | None]) -> set[int] | None:
    """The expert ids this worker owns (None: it reads every expert), decided as vLLM's default
    loader decides them for its own filter, from public parts only: the filter applies to an MoE
    model under --enable-expert-parallel and --enable-ep-weight-filter without EPLB (whose
    redundant slots need every expert); the expert-parallel group flattens data, prefill-context
    and tensor parallelism (FusedMoEParallelConfig.make's order); `compute` is the filter
    module's compute_local_expert_ids (the placement strategy's split)."""
    from vllm.config import get_current_vllm_config
    from vllm.distributed import get_dp_group, get_pcp_group, get_tensor_model_parallel_rank

    parallel = get_current_vllm_config().parallel_config
    if not (
        model_config.is_moe
        and parallel.enable_expert_parallel
        and parallel.enable_ep_weight_filter
        and not parallel.enable_eplb
    ):
        return None
    experts = int(model_config.get_num_experts())
    if experts <= 0:
        return None
    dp, tp = parallel.data_parallel_size, parallel.tensor_parallel_size
    pcp = parallel.prefill_context_parallel_size
    dp_rank = get_dp_group().rank_in_group if dp > 1 else 0
    tp_rank = get_tensor_model_parallel_rank() if tp > 1 else 0
    pcp_rank = get_pcp_group().rank_in_group if pcp > 1 else 0
    ep_rank = (dp_rank * pcp + pcp_rank) * tp + tp_rank
    local = compute(experts, dp * pcp * tp, ep_rank, placement=parallel.expert_placement_strategy)
    return set(local) if local is not None else None


def expert_parallel_enabled() -> bool:
    """Whether this deployment asked for expert parallelism (`--enable-expert-parallel`)."""
    from vllm.config import get_current_vllm_config

    return bool(getattr(get_current_vllm_config().parallel_config, "enable_expert_parallel", False))
