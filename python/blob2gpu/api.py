"""The public functions: load a checkpoint whole, open one to stream it, fetch the files beside
it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from blob2gpu.loading.checkpoint import Checkpoint
from blob2gpu.loading.frameworks import Tensor
from blob2gpu.loading.loader import Loader


def load(
    uri: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    framework: str = "torch",
    credential: object = None,
    config: str | None = None,
    distributed: bool = False,
    tensor_names: Iterable[str] | None = None,
    tensor_filter: Callable[[str], bool] | None = None,
    **settings: object,
) -> dict[str, Tensor]:
    """Load every tensor of a checkpoint; returns {name: tensor} of `framework` on `device`.

    uri: a .safetensors file, a directory of shards, or a model.safetensors.index.json, local or
    in Azure Blob Storage (az://CONTAINER/PREFIX, https://ACCOUNT.blob.core.windows.net/...);
    None takes $MODEL_SOURCE_URI. credential: for Blob URIs, an azure credential object, account
    key or SAS token. device: 'cpu', 'cuda' or 'cuda:N'. framework: 'torch', 'numpy', 'cupy' or
    'dlpack'. config: a YAML settings file (else $BLOB2GPU_CONFIG). distributed: with an
    initialized torch.distributed group, each rank fetches a disjoint part of the bytes and
    broadcasts it (blob2gpu.integrations.distributed): one copy per group from storage.
    tensor_names (a list of names) or tensor_filter (name -> bool): load only those tensors,
    reading only their bytes, e.g. one pipeline stage's layers per rank
    (blob2gpu.loading.selection). settings: see
    blob2gpu.settings (docs/settings.md). Raises a blob2gpu.errors.Blob2GpuError subclass naming
    the shard and what to change; on error nothing stays allocated.
    """
    with Loader(config=config, **settings) as loader:
        request = loader.request(
            uri,
            device=device,
            framework=framework,
            credential=credential,
            tensor_names=tensor_names,
            tensor_filter=tensor_filter,
            streamed=False,  # every tensor is kept: the load holds the checkpoint
        )
        if distributed:
            from blob2gpu.integrations.distributed import load as load_distributed

            return load_distributed(loader, request)
        return loader.load_all(request)


def open(
    uri: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    framework: str = "torch",
    credential: object = None,
    config: str | None = None,
    tensor_names: Iterable[str] | None = None,
    tensor_filter: Callable[[str], bool] | None = None,
    **settings: object,
) -> Checkpoint:
    """Start loading and return a Checkpoint (a context manager) at once.

    Iterate it for (name, tensor) in arrival order; ``get(name)``, ``keys()``, ``metadata``,
    ``progress()`` and ``report`` wait for what they need. Closing it releases the staging it used.
    Arguments as for load().
    """
    loader = Loader(config=config, **settings)
    try:
        request = loader.request(
            uri,
            device=device,
            framework=framework,
            credential=credential,
            tensor_names=tensor_names,
            tensor_filter=tensor_filter,
        )
        checkpoint = loader.start(request)
    except BaseException:
        loader.close()
        raise
    checkpoint.call_on_close(loader.close)
    return checkpoint


def fetch_aux(
    uri: str, dest: str, credential: object = None, config: str | None = None, **settings: object
) -> list[str]:
    """Download the non-weight files beside a Blob checkpoint (config.json, tokenizer files, ...)
    into the local directory `dest`; returns their paths. Weights in other formats beside the
    shards (pytorch_model.bin, *.pth, ...) are left out; files the checkpoint's manifest lists are
    checked against it (setting `verify`). `config`: a YAML settings file, as for load(). Raises
    BlobNotFound, AccessDenied, BlobArchived, StorageUnavailable, BlobChanged, ChecksumMismatch,
    LocalWriteError, or InvalidArgument for a URI that is not a Blob URI."""
    from blob2gpu.settings import resolve
    from blob2gpu.sources import open_source

    source = open_source(uri, resolve(settings, config_path=config), credential)
    try:
        return [str(p) for p in source.fetch_aux(dest)]
    finally:
        source.close()
