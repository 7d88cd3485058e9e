"""Cold start to first token: config and weights from Blob Storage (or a local directory) into a
transformers model built on the meta device, then one greedy token.

    result = blob2gpu.integrations.coldstart.cold_start("az://models/llama/", device="cuda")
    print(result.text, result.report.phase_table())   # first_token is filled

The model's parameters never exist anywhere but where blob2gpu puts them. Its non-persistent
buffers (RoPE inv_freq, position_ids, ...) are not in the checkpoint: they are given memory on
the device and computed by the model's own initializer, as transformers' from_pretrained does.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blob2gpu.errors import InvalidArgument
from blob2gpu.operations.report import LoadReport
from blob2gpu.redaction import redact, strip_query

# Input when the checkpoint ships no tokenizer (taken modulo the vocabulary size).
DEFAULT_INPUT_IDS = (1, 2, 3, 4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ColdStart:
    """One cold start: the ready model, the first token it produced, and the load's report."""

    model: Any  # the transformers model, in eval mode, every tensor on the target device
    input_ids: list[int]  # what the model was given (the tokenized prompt, or DEFAULT_INPUT_IDS)
    token_id: int  # the greedy next token
    text: str | None  # that token decoded; None when the checkpoint has no tokenizer
    report: LoadReport  # the weight load's phases, first_token included
    prepare_seconds: float  # config/tokenizer fetch and meta build, before artifact fetch start
    total_seconds: float  # from the call to the first token


def describe(result: ColdStart) -> str:
    """The cold start for people: the first token, the time before and after the load, the
    load's summary and phase table."""
    shown = repr(result.text) if result.text is not None else "(no tokenizer)"
    return "\n".join(
        [
            f"first token: {result.token_id} {shown} after input ids {result.input_ids}",
            f"config, tokenizer and meta model: {result.prepare_seconds:.3f} s before the load; "
            f"{result.total_seconds:.3f} s in all",
            result.report.summary(),
            result.report.phase_table(),
        ]
    )


def cold_start(
    uri: str,
    device: str = "cpu",
    dtype: Any = None,
    prompt: str = "hello",
    credential: Any = None,
    **settings: Any,
) -> ColdStart:
    """Build the checkpoint's transformers model and produce its first token, timing each phase.

    uri: a Blob URI (config.json and tokenizer files are fetched from beside the weights with
    fetch_aux) or a local checkpoint directory, index or shard (they are read from its
    directory). dtype: a torch dtype to cast floating-point weights to. prompt: tokenized when
    the checkpoint has a tokenizer, else DEFAULT_INPUT_IDS are used. settings: as for
    blob2gpu.load. Returns a ColdStart whose report has every phase, first_token included.
    Raises InvalidArgument when transformers is missing, config.json is missing or unusable, or
    a buffer of the model cannot be initialised; StateDictMismatch when the weights do not fit
    the model; and every error of blob2gpu.load.
    """
    started = time.perf_counter()
    transformers = _import_transformers()
    import torch

    from blob2gpu.integrations.torch_modules import load_into

    with tempfile.TemporaryDirectory(prefix="blob2gpu-coldstart-") as tmp:
        directory = _aux_directory(uri, Path(tmp), credential, settings)
        config = _read_config(transformers, directory, uri)
        tokenizer = _read_tokenizer(transformers, directory)
    model = _build(transformers, config, dtype, meta=True)
    prepare_seconds = time.perf_counter() - started

    report = load_into(model, uri, device=device, dtype=dtype, credential=credential, **settings)
    _materialize_buffers(model, device, lambda: _build(transformers, config, dtype, meta=False))
    model.eval()

    if tokenizer is not None:
        input_ids = list(tokenizer(prompt)["input_ids"])
        if not input_ids:
            raise InvalidArgument(f"the prompt {prompt!r} gives no tokens")
    else:
        vocab = getattr(config, "vocab_size", None) or max(DEFAULT_INPUT_IDS) + 1
        input_ids = [i % vocab for i in DEFAULT_INPUT_IDS]
    with torch.no_grad():
        ids = torch.tensor([input_ids], device=device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        token_id = int(logits[0, -1].argmax())  # int() waits for the device: a real token
    report.mark_first_token()
    text = tokenizer.decode([token_id]) if tokenizer is not None else None
    return ColdStart(
        model=model,
        input_ids=input_ids,
        token_id=token_id,
        text=text,
        report=report,
        prepare_seconds=prepare_seconds,
        total_seconds=time.perf_counter() - started,
    )


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise InvalidArgument(
            f"cold_start needs transformers: pip install 'blob2gpu[transformers]' ({e})"
        ) from None
    return transformers


def _aux_directory(uri: str, tmp: Path, credential: Any, settings: dict[str, Any]) -> Path:
    """The local directory holding config.json and tokenizer files: downloaded into `tmp` for a
    Blob URI, the checkpoint's own directory for a local one."""
    from blob2gpu.api import fetch_aux
    from blob2gpu.sources import source_class
    from blob2gpu.sources.local import resolve_local

    if source_class(uri).remote:
        fetch_aux(uri, str(tmp), credential=credential, **settings)
        return tmp
    location = Path(resolve_local(uri).uri)  # raises SourceUnavailable as blob2gpu.load would
    return location if location.is_dir() else location.parent


def _read_config(transformers: Any, directory: Path, uri: str) -> Any:
    where = redact(strip_query(uri))
    if not (directory / "config.json").is_file():
        raise InvalidArgument(
            f"no config.json beside the weights of '{where}'",
            hint="publish the model directory with its config (blob2gpu publish DIR URI)",
        )
    try:
        return transformers.AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as e:
        raise InvalidArgument(
            f"config.json of '{where}' is not usable by transformers "
            f"{transformers.__version__}: {e}"
        ) from None


def _read_tokenizer(transformers: Any, directory: Path) -> Any:
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def _build(transformers: Any, config: Any, dtype: Any, meta: bool) -> Any:
    """The model of `config`: every tensor on the meta device (meta=True, no memory, no init), or
    parameters on meta and buffers computed for real on the CPU by the modules' own code."""
    import torch

    # transformers 5 calls it dtype; 4.x torch_dtype.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype} if dtype is not None else {}
    with torch.device("meta") if meta else _parameters_on_meta():
        return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def _materialize_buffers(model: Any, device: str, rebuild: Any) -> None:
    """Give every tensor still on the meta device after the load (the non-persistent buffers)
    memory on `device` and its value.

    The value comes from the model's own initializer, transformers' _init_weights(module), as in
    from_pretrained after a meta build. A buffer it leaves unwritten (a transformers version or
    a model that computes it only in __init__) is taken from `rebuild()`, the model built again
    with parameters on meta so that every module's __init__ computes its buffers on the CPU.
    Raises StateDictMismatch for a parameter the load left on meta.
    """
    import torch

    from blob2gpu.integrations.torch_modules import StateDictMismatch

    unwritten = []
    for owner_name, module in model.named_modules():
        prefix = f"{owner_name}." if owner_name else ""
        for name, param in module.named_parameters(recurse=False):
            if param.is_meta:
                raise StateDictMismatch(f"parameter '{prefix}{name}' is not in the checkpoint")
        names = [n for n, t in module.named_buffers(recurse=False) if t.is_meta]
        if not names:
            continue
        fresh = {n: _filled_like(module._buffers[n], device) for n in names}
        module._buffers.update(fresh)
        initializer = _initializer_for(model, owner_name)
        if initializer is not None:
            with torch.no_grad(), _loaded_tensors_hidden(module, keep=set(names)):
                initializer(module)
        unwritten += [
            (module, n, prefix + n)
            for n in names
            if module._buffers[n] is fresh[n] and _still_filled(fresh[n])
        ]
    if not unwritten:
        return
    shadow = dict(rebuild().named_buffers())
    for module, name, full_name in unwritten:
        value = shadow.get(full_name)
        if value is None or value.is_meta:
            raise InvalidArgument(
                f"buffer '{full_name}' of {type(model).__name__} is neither in "
                "the checkpoint nor computed by the model's code"
            )
        module._buffers[name] = value.to(device)


def _initializer_for(model: Any, owner_name: str) -> Any:
    """_init_weights of the innermost transformers model that holds the module `owner_name`."""
    parts = owner_name.split(".") if owner_name else []
    for depth in range(len(parts), -1, -1):
        holder = model.get_submodule(".".join(parts[:depth]))
        if callable(getattr(holder, "_init_weights", None)):
            return holder._init_weights
    return None


@contextlib.contextmanager
def _loaded_tensors_hidden(module: Any, keep: set[str]) -> Iterator[None]:
    """Swap the module's own loaded tensors (all but the buffers in `keep`) for meta stand-ins
    while its initializer runs, so that it cannot overwrite loaded weights."""
    import torch

    saved = []
    for table in (module._parameters, module._buffers):
        for name, tensor in list(table.items()):
            if tensor is None or tensor.is_meta or (table is module._buffers and name in keep):
                continue
            saved.append((table, name, tensor))
            stand_in = torch.empty_like(tensor, device="meta")
            table[name] = (
                torch.nn.Parameter(stand_in, tensor.requires_grad)
                if isinstance(tensor, torch.nn.Parameter)
                else stand_in
            )
    try:
        yield
    finally:
        for table, name, tensor in saved:
            table[name] = tensor


def _filled_like(tensor: Any, device: str) -> Any:
    """`tensor`'s shape and dtype on `device`, filled with a value no initializer writes
    everywhere (NaN, or the integer dtype's minimum), so that an unwritten buffer shows."""
    import torch

    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        value: float = math.nan
    elif tensor.dtype == torch.bool:
        value = False
    else:
        value = torch.iinfo(tensor.dtype).min
    return torch.full(tensor.shape, value, dtype=tensor.dtype, device=device)


def _still_filled(tensor: Any) -> bool:
    """True when a _filled_like tensor may still hold only its fill value (always, for bool:
    False is a value an initializer writes)."""
    import torch

    if tensor.numel() == 0:
        return False
    if tensor.dtype == torch.bool:
        return True
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        return bool(torch.isnan(tensor).all())
    return bool((tensor == torch.iinfo(tensor.dtype).min).all())


_build_lock = threading.Lock()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, parameters registered by modules under construction go to the meta device
    (accelerate's init_empty_weights(include_buffers=False)); buffers stay real. It patches
    torch.nn.Module.register_parameter for the whole process, hence the lock."""
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(self: Any, name: str, param: Any) -> None:
        register(self, name, param)
        param = self._parameters[name]
        if param is not None and not param.is_meta:  # a tied (already meta) one keeps its identity
            self._parameters[name] = type(param)(param.to("meta"), param.requires_grad)

    with _build_lock:
        torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
