"""Hand-off to consumer frameworks through DLPack: each framework's own ``from_dlpack``
(torch.from_dlpack, numpy.from_dlpack, cupy.from_dlpack), sharing the view's memory without a
copy. A CUDA consumer passes its current stream, so that stream waits on the load's events instead
of the host waiting. The core's TensorView is itself a DLPack producer, so framework='dlpack'
returns it unchanged.

The framework module is looked up when a load starts, which in a process that already imported it
is a dictionary lookup: no file is read (and the GIL not given up) to hand a tensor out.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from blob2gpu import _core
from blob2gpu.errors import DTypeNotSupported, InvalidArgument

FRAMEWORKS = ("torch", "numpy", "cupy", "dlpack")

# A tensor of the framework the caller chose at run time: a torch.Tensor, numpy.ndarray,
# cupy.ndarray or _core.TensorView. The one untyped value of the load path: which of them is known
# only when the load is asked for, and the frameworks are optional imports.
Tensor = Any

# dtypes every DLPack consumer we support understands; any other one may be refused by a consumer.
_COMMON_DTYPES = {"BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "F32", "F64"}


def converter(
    framework: str, device: str, unsupported_dtype: str
) -> Callable[[_core.TensorView], Tensor]:
    """Return a function TensorView -> framework tensor.

    Raises InvalidArgument for an unknown framework or one that cannot live on `device`, and
    (when called) DTypeNotSupported where the framework refuses a dtype and unsupported_dtype is
    'raise'; with 'bytes' such tensors come back as uint8 views of their raw bytes.
    """
    if framework not in FRAMEWORKS:
        raise InvalidArgument(f"framework '{framework}' is not one of {', '.join(FRAMEWORKS)}")
    if framework == "dlpack":
        return lambda view: view
    if framework == "numpy" and device != "cpu":
        raise InvalidArgument(
            f"numpy arrays live in host memory; device '{device}' needs "
            "framework='torch', 'cupy' or 'dlpack'"
        )
    try:
        module = importlib.import_module(framework)
    except ImportError as e:
        raise InvalidArgument(
            f"framework '{framework}' is not installed ({e})",
            hint=f"pip install 'blob2gpu[{framework}]' (or your own build of it), or pick another "
            "framework (numpy on the CPU, dlpack)",
        ) from None
    convert: Callable[[_core.TensorView], Tensor] | None = getattr(module, "from_dlpack", None)
    if convert is None:
        raise InvalidArgument(
            f"this {framework} has no from_dlpack (torch >= 1.10, numpy >= 1.22, cupy >= 10 do)",
            hint="upgrade it, or pick framework='dlpack'",
        )

    def to_framework(view: _core.TensorView) -> Tensor:
        try:
            return convert(view)
        except Exception as e:
            if view.dtype in _COMMON_DTYPES:
                raise
            if unsupported_dtype == "bytes":
                return convert(view.as_bytes())
            raise DTypeNotSupported(
                f"tensor '{view.name}': {framework} cannot hold dtype {view.dtype} ({e})",
                hint="pass unsupported_dtype='bytes' to get its raw bytes as uint8",
            ) from e

    return to_framework
