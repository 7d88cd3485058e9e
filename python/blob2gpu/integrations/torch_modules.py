"""PyTorch integration: weights loaded straight into a module built on the meta device, so a cold
start allocates each weight once, where it will be used.

    with torch.device("meta"):
        model = MyModel(config)
    report = load_into(model, "az://models/llama/", device="cuda")
"""

from __future__ import annotations

from typing import Any

import torch

from blob2gpu.errors import InvalidArgument
from blob2gpu.operations.report import LoadReport


class StateDictMismatch(InvalidArgument):
    """The checkpoint's tensors do not match the module's parameters and buffers."""


def _tied_names(module: torch.nn.Module) -> dict[str, str]:
    """Names that share a tensor with an earlier name (tied weights) -> that earlier name."""
    first_by_id: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]:
        if id(tensor) in first_by_id:
            tied[name] = first_by_id[id(tensor)]
        else:
            first_by_id[id(tensor)] = name
    return tied


def load_into(
    module: torch.nn.Module,
    uri: str | None = None,
    device: str = "cuda",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    prefix: str = "",
    credential: Any = None,
    **settings: Any,
) -> LoadReport:
    """Load a checkpoint into `module`'s parameters and buffers (load_state_dict(assign=True)).

    The module may live on the meta device: its tensors are replaced by the loaded ones. `prefix`
    is stripped from checkpoint names; `dtype` casts floating-point tensors. Tied weights (one
    tensor under two names) need the checkpoint to hold only one of the names.
    With strict=False only the tensors the module has are read (a tensor selection), so a
    pipeline stage built with some of the layers fetches just those.
    Returns the LoadReport. Raises StateDictMismatch naming missing, unexpected or misshapen
    tensors (all of them, with strict=True; only misshapen ones otherwise), and every error of
    blob2gpu.load.
    """
    from blob2gpu.api import open as open_checkpoint

    expected = module.state_dict(keep_vars=True)
    tied = _tied_names(module)
    if not strict and "tensor_names" not in settings and "tensor_filter" not in settings:
        wanted = {prefix + n for n in (*expected, *tied.values())}
        settings["tensor_filter"] = wanted.__contains__
    with open_checkpoint(
        uri, device=device, framework="torch", credential=credential, **settings
    ) as checkpoint:
        loaded = checkpoint.to_dict()
        report = checkpoint.report
    if prefix:
        loaded = {k[len(prefix) :]: v for k, v in loaded.items() if k.startswith(prefix)}
    missing = sorted(
        n for n in expected if n not in loaded and not (n in tied and tied[n] in loaded)
    )
    unexpected = sorted(n for n in loaded if n not in expected)
    misshapen = sorted(
        f"{n}: checkpoint {tuple(t.shape)} vs module {tuple(expected[n].shape)}"
        for n, t in loaded.items()
        if n in expected and tuple(t.shape) != tuple(expected[n].shape)
    )
    problems = []
    if misshapen:
        problems.append("shapes differ: " + "; ".join(misshapen[:5]))
    if strict and missing:
        problems.append(f"{len(missing)} missing from the checkpoint: " + ", ".join(missing[:5]))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} not in the module: " + ", ".join(unexpected[:5]))
    if problems:
        raise StateDictMismatch(
            f"'{report.uri}' does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    if dtype is not None:
        loaded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in loaded.items()}
    for name, target in tied.items():
        if target in loaded and name not in loaded:
            loaded[name] = loaded[target]
    module.load_state_dict(
        {k: v for k, v in loaded.items() if k in expected}, strict=False, assign=True
    )
    # Assignment made two tensors of every tied pair: make them one again.
    for name, target in tied.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        target_owner_name, _, target_attr = target.rpartition(".")
        setattr(owner, attr, getattr(module.get_submodule(target_owner_name), target_attr))
    return report
