"""Every error blob2gpu raises, under one base class.

The core raises by kind name (csrc/errors.hpp); each kind is a class here with the same name, so
``except blob2gpu.errors.InvalidOffsets`` catches exactly that diagnosis and
``except blob2gpu.Blob2GpuError`` catches them all. Messages name the shard, the tensor, the offset
or the setting to change, and never carry credentials.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, TypeVar

_E = TypeVar("_E", bound="Blob2GpuError")


class Blob2GpuError(Exception):
    """Base class of every blob2gpu error.

    Besides its message (for people), every error carries what code needs as fields set by its
    constructor, None where they do not apply: ``shard`` (the shard's name), ``blob`` (the blob's
    path in its container), ``offset`` (a byte offset in the shard), ``etag`` (the version the
    load pinned), ``hint`` (what to check or change, as said at the end of the message: the
    raiser's, else the class's ``remedy``). Code reads these fields, never the message.
    """

    remedy: ClassVar[str | None] = None  # the hint of this diagnosis when the raiser gives none

    def __init__(
        self,
        message: str = "",
        *,
        shard: str | None = None,
        blob: str | None = None,
        offset: int | None = None,
        etag: str | None = None,
        hint: str | None = None,
    ) -> None:
        hint = hint if hint is not None else self.remedy
        if hint and hint not in message:
            message = f"{message}; {hint}" if message else hint
        super().__init__(message)
        self.message = message
        self.shard = shard
        self.blob = blob
        self.offset = offset
        self.etag = etag
        self.hint = hint

    def evolve(self: _E, **fields: Any) -> _E:
        """A copy of this error (same class and message) with `fields` replaced; raises
        AttributeError for a field this error does not have."""
        changed = copy.copy(self)
        for name, value in fields.items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__} has no field '{name}'")
            setattr(changed, name, value)
        return changed


# --- the safetensors header -------------------------------------------------------------------
class InvalidHeader(Blob2GpuError, ValueError):
    """A shard's safetensors header breaks the format's rules; the shard is not loaded."""

    remedy = (
        "the file is not a safetensors shard, or was cut short or changed after it was written: "
        "write it again and publish it again"
    )


class HeaderTooLarge(InvalidHeader):
    """The declared header length is over the 100,000,000-byte cap."""


class HeaderTruncated(InvalidHeader):
    """The shard is shorter than its 8-byte length prefix, or the length points past its end."""


class HeaderNotUtf8(InvalidHeader):
    """The header bytes are not valid UTF-8."""


class HeaderNotJson(InvalidHeader):
    """The header is not JSON, or not a JSON object."""


class InvalidTensorEntry(InvalidHeader):
    """A tensor entry lacks dtype, shape or data_offsets, or has them of the wrong type."""


class UnknownDType(InvalidHeader):
    """A tensor's dtype is not a safetensors dtype."""


class InvalidShape(InvalidHeader):
    """A shape is not a list of non-negative integers, or its element count overflows."""


class InvalidOffsets(InvalidHeader):
    """Offsets overlap, leave gaps, or do not cover the data region exactly."""


class TensorSizeMismatch(InvalidHeader):
    """A tensor's byte range does not match its shape times its dtype's size."""


class DuplicateTensor(InvalidHeader):
    """The same tensor name appears twice in one header."""


class InvalidMetadata(InvalidHeader):
    """``__metadata__`` is not a map of strings."""


class InvalidIndex(InvalidHeader):
    """``model.safetensors.index.json`` is malformed or disagrees with the shards."""

    remedy = "write model.safetensors.index.json again from the shards it is published with"


# --- sources ----------------------------------------------------------------------------------
class SourceUnavailable(Blob2GpuError, OSError):
    """A checkpoint, shard or index could not be found or opened."""


class SourceReadError(Blob2GpuError, OSError):
    """A read failed or ended early (the file changed under the load)."""


class BlobNotFound(SourceUnavailable):
    """The container or blob does not exist (HTTP 404); the message names both."""

    remedy = "check the URI's account, container and path (blob names are case-sensitive)"


class AccessDenied(SourceUnavailable):
    """The storage account refused the credential (HTTP 401/403); no secret is in the message."""


class ProxyAuthenticationRefused(AccessDenied):
    """The HTTP proxy (HTTPS_PROXY / HTTP_PROXY) refused its credentials (HTTP 407); the message
    names the proxy and its variable, never the password."""


class BlobArchived(SourceUnavailable):
    """A blob to read is in the Archive access tier (or still being rehydrated from it), so the
    service refuses its bytes for hours; the message names every such blob and what to do."""


class StorageUnavailable(SourceUnavailable):
    """The storage endpoint kept failing (resets, timeouts, 5xx, throttling) after every retry."""


class ChecksumMismatch(Blob2GpuError):
    """Bytes differ from the manifest's checksum; the message names the shard and byte range.
    Nothing from the load is returned (unless fail_if_checksum_mismatch is off).

    ``cache_entry``: the NVMe cache entry of the shard when the load found that entry damaged
    and the shard's fetch from Blob failed its check too (the entry's data was removed; `blob2gpu
    cache verify --repair` fetches it again); None otherwise. A damaged entry alone is no error:
    the load fetches the shard again from Blob.
    """

    remedy = (
        "load again (corruption on the wire or in the cache does not repeat); if it does, the "
        "blob changed after it was published: publish it again (`blob2gpu publish`)"
    )

    def __init__(self, message: str = "", *, cache_entry: str | None = None, **fields: Any):
        super().__init__(message, **fields)
        self.cache_entry = cache_entry


class InvalidManifest(Blob2GpuError, ValueError):
    """blob2gpu.manifest.json is malformed, of an unknown version, or disagrees with the shards."""


class ManifestMissing(SourceUnavailable):
    """verify='crc32c' was asked for but the checkpoint has no blob2gpu.manifest.json."""


class BlobChanged(Blob2GpuError):
    """A blob was overwritten during the load (its etag changed); nothing mixed is returned.

    ``completed_shards``: {(blob path, etag): {name: tensor}} of the shards that had arrived
    whole, for a load that restarts (on_blob_change='restart') to keep; empty otherwise.
    """

    def __init__(
        self,
        message: str = "",
        *,
        completed_shards: dict[tuple[str, str | None], dict[str, Any]] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, **fields)
        self.completed_shards = completed_shards or {}


class LocalWriteError(Blob2GpuError, OSError):
    """A local file could not be written (disk full, out of inodes, read-only, permissions); the
    message names the path, and nothing partial is left under the destination name."""


# --- memory and devices -----------------------------------------------------------------------
class PinnedMemoryUnavailable(Blob2GpuError, MemoryError):
    """Staging memory could not be pinned and use_pinned_host_fallback is off; ``hint`` says how
    to turn it on (in the caller's syntax: blob2gpu.phrasing)."""

    def __init__(self, message: str = "", **fields: Any) -> None:
        from blob2gpu import phrasing

        hint = (
            fields.pop("hint", None) or f"or {phrasing.setting('use_pinned_host_fallback', True)}"
        )
        said = message if hint in message else (f"{message}, {hint}" if message else hint)
        super().__init__(said, hint=hint, **fields)


class InsufficientGPUMemory(Blob2GpuError, MemoryError):
    """Before any download: free GPU memory is below the weights x gpu_headroom_factor."""


class InsufficientHostMemory(Blob2GpuError, MemoryError):
    """Before any download: available host RAM is below the weights x host_headroom_factor."""


class GPUOutOfMemory(Blob2GpuError, MemoryError):
    """A device allocation failed during the load; everything the load allocated was released."""


class HostOutOfMemory(Blob2GpuError, MemoryError):
    """Host memory for a cpu-target shard could not be allocated."""


class CudaDriverUnavailable(Blob2GpuError, RuntimeError):
    """No usable CUDA driver or GPU (set BLOB2GPU_CUDA_DRIVER, or load to the CPU); ``hint``
    says how to load to the CPU (in the caller's syntax: blob2gpu.phrasing), ``driver_status``
    (a _core.DriverStatus, set by the core) why: NOT_FOUND, MISSING_ENTRY_POINT, INIT_FAILED,
    NO_DEVICE."""

    def __init__(self, message: str = "", *, driver_status: Any = None, **fields: Any) -> None:
        from blob2gpu import phrasing

        hint = fields.pop("hint", None) or f"or load to the CPU: {phrasing.device('cpu')}"
        super().__init__(message, hint=hint, **fields)
        self.driver_status = driver_status


class CudaError(Blob2GpuError, RuntimeError):
    """A CUDA driver call failed."""


# --- export and arguments ---------------------------------------------------------------------
class DTypeNotSupported(Blob2GpuError, TypeError):
    """The chosen framework cannot hold this dtype (unsupported_dtype='bytes' returns raw bytes)."""


class InvalidArgument(Blob2GpuError, ValueError):
    """A caller error: an unknown device, framework or URI form."""


class TensorNotFound(InvalidArgument):
    """A tensor asked for by name (tensor_names=) is in no shard of the checkpoint, or a glob
    (`blob2gpu load --match`) matches no tensor of it.

    ``names``: the names no shard holds; ``patterns``: the globs that matched nothing (each
    empty when not the cause).
    """

    def __init__(
        self,
        message: str = "",
        *,
        names: tuple[str, ...] = (),
        patterns: tuple[str, ...] = (),
        **fields: Any,
    ) -> None:
        super().__init__(message, **fields)
        self.names = names
        self.patterns = patterns


class MalformedCredential(InvalidArgument):
    """A credential that cannot be used as given, found before any request: an account key
    that is not base64 (cut short or mangled when copied). The message names where it came
    from (AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY, the credential argument), never
    its value."""


class ShardCountMismatch(InvalidArgument):
    """The checkpoint has a different number of shards than model.shard_count says."""


class ConfigError(InvalidArgument):
    """A setting is unknown or has a bad value.

    The message names the key, where it came from and the valid values.
    """


class LoadCancelled(Blob2GpuError):
    """The load was closed or cancelled before it finished."""


__all__ = [
    name
    for name, value in globals().items()
    if isinstance(value, type) and issubclass(value, Blob2GpuError)
]
