"""Azure Blob Storage: URIs, credentials and listing.

A URI names one blob, a prefix holding shards (with or without model.safetensors.index.json), or
the index itself:
    az://CONTAINER/PREFIX              account from AZURE_STORAGE_CONNECTION_STRING or
                                       AZURE_STORAGE_ACCOUNT_NAME
    https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS]
    http://127.0.0.1:PORT/ACCOUNT/CONTAINER/PREFIX   path-style (emulators, private endpoints)
    abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX   the Hadoop forms (Databricks, Fabric,
                                       Synapse; also abfs, wasbs, wasb) and https://ACCOUNT.dfs...
                                       URLs: read through the account's blob endpoint over HTTPS
The byte ranges themselves are fetched by blob_feeder.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from blob2gpu.errors import (
    AccessDenied,
    BlobArchived,
    BlobNotFound,
    InvalidArgument,
    InvalidIndex,
    ProxyAuthenticationRefused,
    SourceUnavailable,
    StorageUnavailable,
)
from blob2gpu.redaction import redact
from blob2gpu.sources.plan import ShardPlan, ShardRef

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "blob2gpu.manifest.json"
HADOOP_SCHEMES = ("abfss", "abfs", "wasbs", "wasb")
BLOB_SCHEMES = ("az", "http", "https", *HADOOP_SCHEMES)
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class BlobLocation:
    """Where a checkpoint lives. `account_url` never carries a SAS; `sas` holds it apart."""

    account_url: str
    account: str
    container: str
    path: str  # a blob name, or a prefix ('' for the whole container)
    sas: str | None = None

    def describe(self, blob: str | None = None) -> str:
        """How errors name a place: account, container and blob, never a secret."""
        where = f"container '{self.container}' of account '{self.account}'"
        return f"blob '{blob}' in {where}" if blob is not None else where


def is_blob_uri(uri: str) -> bool:
    return urlparse(uri).scheme in BLOB_SCHEMES


def _is_ip_or_localhost(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# The storage emulators' well-known development account (Azurite, the Azure Storage Emulator):
# published in Azure's documentation, not a secret.
DEVELOPMENT_ACCOUNT = "devstoreaccount1"
DEVELOPMENT_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def parse_connection_string(text: str) -> dict[str, str]:
    """The key=value pairs of an Azure Storage connection string; the emulator shortcut
    'UseDevelopmentStorage=true' (optionally with DevelopmentStorageProxyUri) is expanded to
    the development account on port 10000, as the SDKs do."""
    out = {}
    for part in text.split(";"):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
    if out.get("UseDevelopmentStorage", "").lower() == "true":
        host = out.get("DevelopmentStorageProxyUri", "http://127.0.0.1").rstrip("/")
        out.setdefault("AccountName", DEVELOPMENT_ACCOUNT)
        out.setdefault("AccountKey", DEVELOPMENT_ACCOUNT_KEY)
        out.setdefault("BlobEndpoint", f"{host}:10000/{DEVELOPMENT_ACCOUNT}")
    return out


def _account_url_from_connection_string(cs: Mapping[str, str]) -> tuple[str, str]:
    account = cs.get("AccountName", "")
    if "BlobEndpoint" in cs:
        url = cs["BlobEndpoint"].rstrip("/")
        if not account:
            parsed = urlparse(url)
            account = (
                parsed.path.strip("/").split("/")[0]
                if _is_ip_or_localhost(parsed.hostname or "")
                else (parsed.hostname or "").split(".")[0]
            )
        return url, account
    if not account:
        raise InvalidArgument(
            "AZURE_STORAGE_CONNECTION_STRING has neither AccountName nor BlobEndpoint"
        )
    protocol = cs.get("DefaultEndpointsProtocol", "https")
    suffix = cs.get("EndpointSuffix", "core.windows.net")
    return f"{protocol}://{account}.blob.{suffix}", account


def parse_blob_uri(uri: str, environ: Mapping[str, str] | None = None) -> BlobLocation:
    """Parse a Blob URI into a BlobLocation. Raises InvalidArgument naming what is missing."""
    env = os.environ if environ is None else environ
    parsed = urlparse(uri)
    if parsed.scheme == "az":
        container, path = parsed.netloc, parsed.path.lstrip("/")
        if not container:
            raise InvalidArgument(f"'{redact(uri)}' names no container: use az://CONTAINER/PREFIX")
        if env.get("AZURE_STORAGE_CONNECTION_STRING"):
            cs = parse_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])
            account_url, account = _account_url_from_connection_string(cs)
        elif env.get("AZURE_STORAGE_ACCOUNT_NAME"):
            account = env["AZURE_STORAGE_ACCOUNT_NAME"]
            account_url = f"https://{account}.blob.core.windows.net"
        else:
            raise InvalidArgument(
                "az:// URIs need the storage account: set "
                "AZURE_STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_CONNECTION_STRING)"
            )
        return BlobLocation(account_url, account, container, path)
    host = _blob_endpoint_host(parsed.hostname or "")
    # URLs carry blob names percent-encoded ('my%20model'); the SDK encodes names itself.
    segments = [unquote(s) for s in parsed.path.split("/")]
    segments = segments[1:] if segments and segments[0] == "" else segments
    port = f":{parsed.port}" if parsed.port else ""
    if parsed.scheme in HADOOP_SCHEMES:  # CONTAINER@ACCOUNT.dfs.core.windows.net/PATH
        if not parsed.username or "." not in host or _is_ip_or_localhost(host):
            raise InvalidArgument(
                f"'{redact(uri)}' needs the form {parsed.scheme}://CONTAINER@ACCOUNT.dfs."
                "core.windows.net/PREFIX"
            )
        # Always HTTPS: storage accounts require secure transfer, and tokens need it.
        return BlobLocation(
            f"https://{host}{port}",
            host.split(".")[0],
            unquote(parsed.username),
            "/".join(s for s in segments if s),
            _sas_of(uri, parsed.query),
        )
    if _is_ip_or_localhost(host):  # path-style: /ACCOUNT/CONTAINER/PATH
        if len(segments) < 2 or not segments[0] or not segments[1]:
            raise InvalidArgument(
                f"'{redact(uri)}' is path-style and needs /ACCOUNT/CONTAINER/PREFIX"
            )
        account, container, rest = segments[0], segments[1], segments[2:]
        account_url = f"{parsed.scheme}://{host}{port}/{account}"
    else:
        if not segments or not segments[0]:
            raise InvalidArgument(f"'{redact(uri)}' names no container")
        account = host.split(".")[0]
        container, rest = segments[0], segments[1:]
        account_url = f"{parsed.scheme}://{host}{port}"
    return BlobLocation(account_url, account, container, "/".join(rest), _sas_of(uri, parsed.query))


def _blob_endpoint_host(host: str) -> str:
    """The blob endpoint of a storage host: ACCOUNT.dfs.SUFFIX (Data Lake Storage) becomes
    ACCOUNT.blob.SUFFIX, which serves the same files of a hierarchical-namespace account."""
    labels = host.split(".")
    if len(labels) > 2 and labels[1] == "dfs":
        labels[1] = "blob"
    return ".".join(labels)


def _sas_of(uri: str, query: str) -> str | None:
    """The URI's query, which must be a SAS; a snapshot or version query is refused, not sent."""
    if not query:
        return None
    keys = {k.lower() for k in parse_qs(query, keep_blank_values=True)}
    if keys & {"snapshot", "versionid"}:
        raise InvalidArgument(
            f"'{redact(uri)}' names a blob snapshot or version: blob2gpu loads the current "
            "blobs; copy that version to its own prefix to load it"
        )
    if "sig" not in keys:
        raise InvalidArgument(
            f"'{redact(uri)}' has a query that is not a SAS token (no sig=): drop it, or pass "
            "the whole SAS"
        )
    return query


_default_credential: Any = None
_default_credential_lock = threading.Lock()


def default_azure_credential() -> Any:
    """azure-identity's DefaultAzureCredential, made once per process: Azure's guidance is to
    reuse credential instances, and a later load then reuses the token the first one acquired
    (workload identity's token exchange, IMDS) instead of acquiring another. None when
    azure-identity is not installed."""
    global _default_credential
    with _default_credential_lock:
        if _default_credential is None:
            try:
                from azure.identity import DefaultAzureCredential
            except ImportError:
                return None
            _default_credential = DefaultAzureCredential()
        return _default_credential


def resolve_credential(
    location: BlobLocation, explicit: Any = None, environ: Mapping[str, str] | None = None
) -> tuple[Any, str]:
    """Pick the credential for `location`: (credential, how it was chosen, for the report).

    Order: an explicit credential; a SAS in the URI; AZURE_STORAGE_CONNECTION_STRING's key or SAS;
    AZURE_STORAGE_KEY; AZURE_STORAGE_SAS_TOKEN; azure-identity's DefaultAzureCredential when it is
    installed (workload or managed identity on AKS); anonymous. Raises InvalidArgument when a
    bearer token would cross plain HTTP.
    """
    env = os.environ if environ is None else environ
    credential: Any = None
    how = "anonymous"
    if explicit is not None:
        credential, how = explicit, "explicit credential"
    elif location.sas:
        how = "SAS in the URI"
    elif env.get("AZURE_STORAGE_CONNECTION_STRING"):
        cs = parse_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])
        if cs.get("AccountKey"):
            credential = {
                "account_name": cs.get("AccountName", location.account),
                "account_key": cs["AccountKey"],
            }
            how = "account key from AZURE_STORAGE_CONNECTION_STRING"
        elif cs.get("SharedAccessSignature"):
            credential, how = (
                cs["SharedAccessSignature"],
                "SAS from AZURE_STORAGE_CONNECTION_STRING",
            )
    elif env.get("AZURE_STORAGE_KEY"):
        credential = {"account_name": location.account, "account_key": env["AZURE_STORAGE_KEY"]}
        how = "account key from AZURE_STORAGE_KEY"
    elif env.get("AZURE_STORAGE_SAS_TOKEN"):
        credential, how = env["AZURE_STORAGE_SAS_TOKEN"].lstrip("?"), "AZURE_STORAGE_SAS_TOKEN"
    else:
        credential = default_azure_credential()
        if credential is not None:
            how = "DefaultAzureCredential (azure-identity)"
    if hasattr(credential, "get_token"):
        parsed = urlparse(location.account_url)
        if parsed.scheme != "https":  # loopback included: azure-core and Azurite refuse it too
            raise InvalidArgument(
                f"refusing to send a bearer token ({how}) over plain HTTP to "
                f"'{parsed.hostname}': use an https:// URL (emulators: serve HTTPS)"
            )
    return credential, how


def storage_error(
    error: BaseException, location: BlobLocation, blob: str | None = None, what: str = "request"
) -> Exception:
    """Map an azure-core/storage exception to a blob2gpu error naming the place, without secrets.

    Transient failures come back as StorageUnavailable; callers that retry test is_transient first.
    """
    status = getattr(error, "status_code", None)
    code = getattr(error, "error_code", None)
    place = location.describe(blob)
    from azure.core.exceptions import ClientAuthenticationError

    if status is None and isinstance(error, ClientAuthenticationError):
        # The credential could not get a token (DefaultAzureCredential found no identity, an
        # expired client secret): nothing a retry changes. Its first line says which.
        hint = (
            "give the pod a workload or managed identity with 'Storage Blob Data Reader', or set "
            "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY or a SAS"
        )
        return AccessDenied(
            f"{what}: no token to reach {place} ({_one_line(error)}); {hint}", blob=blob, hint=hint
        )
    at_proxy = proxy_problem(error)
    if at_proxy is not None:
        said, refused = at_proxy
        proxy, variable = _proxy_of(location.account_url)
        if refused:
            hint = f"check the user and password in {variable}"
            return ProxyAuthenticationRefused(
                f"{what}: the proxy {proxy} refused its credentials (HTTP 407) on the way to "
                f"{place}; {hint}",
                blob=blob,
                hint=hint,
            )
        return StorageUnavailable(
            f"{what}: the proxy {proxy} failed on the way to {place} ({said}); check that it "
            f"is reachable and allows this host ({variable}), or leave the host out with "
            "NO_PROXY"
        )
    untrusted = certificate_problem(error)
    if untrusted is not None:
        host = urlparse(location.account_url).hostname
        return SourceUnavailable(
            f"{what}: the TLS certificate of '{host}' is not trusted ({untrusted}) reaching "
            f"{place}; install the CA that signed it, or point REQUESTS_CA_BUNDLE at it"
        )
    code = getattr(code, "value", code)  # the SDK hands some codes over as an enum member
    # The generated operations leave the code in the response's header only.
    code = code or response_header(error, "x-ms-error-code")
    detail = f"HTTP {status}" + (f" {code}" if code else "") if status else type(error).__name__
    if code in ARCHIVE_ERROR_CODES:
        why = "being rehydrated" if code == "BlobBeingRehydrated" else "in the Archive tier"
        return archived_error(location, {blob or "?": why}, what)
    if status == 404:
        if code == "ContainerNotFound" or blob is None:
            return BlobNotFound(f"{what}: {location.describe()} does not exist ({detail})")
        return BlobNotFound(f"{what}: {place} does not exist ({detail})")
    if status in (401, 403):
        meaning, check = DENIALS.get(code or "", (None, DEFAULT_DENIAL_CHECK))
        return AccessDenied(
            f"{what}: access to {place} was denied ({detail}"
            + (f": {meaning}" if meaning else "")
            + f"); check {check}",
            blob=blob,
            hint=f"check {check}",
        )
    if status in TRANSIENT_STATUS or status is None:
        return StorageUnavailable(f"{what}: {place} is unavailable ({detail}: {_said(error)})")
    return SourceUnavailable(f"{what}: {place} failed ({detail}: {_said(error)})")


DEFAULT_DENIAL_CHECK = (
    "the credential: SAS expiry and permissions (read, list), the account key, or the "
    "identity's 'Storage Blob Data Reader' role"
)
# What the service's 401/403 error codes mean, and what to check for each.
DENIALS = {
    "AuthenticationFailed": (
        "the signature did not verify",
        "the account key (or the key the SAS was signed with), the SAS expiry (se=), and this "
        "node's clock (more than 15 minutes off fails every request)",
    ),
    "AuthorizationFailure": (
        "the account refused this request",
        "the storage firewall and virtual network rules (do they admit this node or its "
        "private endpoint?), then the credential: the account key, or the SAS's signature, "
        "expiry and permissions",
    ),
    "AuthorizationPermissionMismatch": (
        "the credential lacks a permission",
        "that a SAS grants read and list (sp=rl), or that the identity has the 'Storage Blob "
        "Data Reader' role on the account or container",
    ),
    "AuthorizationProtocolMismatch": (
        "the SAS allows HTTPS only (spr=https)",
        "the endpoint: use https://",
    ),
    "AuthorizationSourceIPMismatch": (
        "the SAS admits other IP addresses (sip=)",
        "this node's egress IP address against the SAS's range",
    ),
    "AuthorizationResourceTypeMismatch": (
        "the account SAS does not cover containers and blobs",
        "the SAS's resource types: srt=co",
    ),
    "AuthorizationServiceMismatch": (
        "the account SAS does not cover the blob service",
        "the SAS's services: ss=b",
    ),
    "KeyBasedAuthenticationNotPermitted": (
        "the account disallows shared key access",
        "the credential: use Entra ID (a workload or managed identity with 'Storage Blob Data "
        "Reader') or a user delegation SAS",
    ),
    "InvalidAuthenticationInfo": (
        "the bearer token was refused",
        "the token's tenant, audience (https://storage.azure.com) and expiry",
    ),
    "NoAuthenticationInformation": (
        "the request carried no credential",
        "that a credential is configured: the container is not public",
    ),
}


def response_header(error: BaseException, name: str) -> str | None:
    """Header `name` of the HTTP response a failed request got, or None (no response, or no
    such header)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    return headers.get(name) if headers is not None else None


def _said(error: BaseException) -> str:
    """What the service or the transport said, in one short line: the service's message (the
    HTTP reason Azure sends) rather than the whole XML error body."""
    reason = getattr(error, "reason", None) if getattr(error, "status_code", None) else None
    return _one_line(reason if isinstance(reason, str) and reason else error)


# The service's codes for reading a blob of the Archive tier, or one still being rehydrated.
ARCHIVE_ERROR_CODES = ("BlobArchived", "BlobBeingRehydrated")


def archived_reason(blob: Any) -> str | None:
    """Why the service refuses a listed blob's bytes (its access tier), or None when it serves
    them. A blob being rehydrated stays in the Archive tier until rehydration completes."""
    if str(getattr(blob, "blob_tier", None) or "").lower() != "archive":
        return None
    status = getattr(blob, "archive_status", None)
    return f"being rehydrated ({status})" if status else "in the Archive tier"


def archived_error(
    location: BlobLocation, blobs: Mapping[str, str], what: str | None = None
) -> BlobArchived:
    """BlobArchived naming `blobs` (blob name -> archived_reason) and what would make them
    readable."""
    named = [f"'{b}' ({why})" for b, why in blobs.items()]
    shown = ", ".join(named[:8]) + (f" and {len(named) - 8} more" if len(named) > 8 else "")
    return BlobArchived(
        (f"{what}: " if what else "")
        + f"{shown} in {location.describe()}: the service serves no bytes of a blob in the "
        "Archive access tier until it is rehydrated; rehydrate to Hot or Cool (az storage blob "
        "set-tier --tier Hot --rehydrate-priority High; hours) or copy the checkpoint to an "
        "online tier, then load again"
    )


def _causes(error: BaseException) -> Any:
    """`error` and what caused it, down the chain azure-core -> requests -> urllib3 -> ssl."""
    seen: set[int] = set()
    pending: list[Any] = [error]
    while pending:
        e = pending.pop()
        if not isinstance(e, BaseException) or id(e) in seen or len(seen) > 16:
            continue
        seen.add(id(e))
        yield e
        pending += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
        pending += [getattr(e, "reason", None), *e.args]


def certificate_problem(error: BaseException) -> str | None:
    """What TLS certificate verification said, when that is why `error` happened; else None."""
    for e in _causes(error):
        if isinstance(e, ssl.SSLCertVerificationError):
            return e.verify_message or str(e)
    return None


def proxy_problem(error: BaseException) -> tuple[str, bool] | None:
    """(what the HTTP proxy said, whether it refused the proxy credentials: HTTP 407) when the
    failure happened at the proxy (HTTPS_PROXY / HTTP_PROXY); else None."""
    if getattr(error, "status_code", None) == 407:  # plain HTTP: the proxy answered itself
        return "HTTP 407 Proxy Authentication Required", True
    found = [e for e in _causes(error) if type(e).__name__ == "ProxyError"]  # urllib3, requests
    if not found:
        return None
    # urllib3's carries (what failed, why): 'Unable to connect to proxy', OSError('Tunnel
    # connection failed: 407 Proxy Authentication Required').
    detailed = [e for e in found if len(e.args) > 1]
    e = detailed[0] if detailed else found[0]
    said = f"{e.args[0]}: {_one_line(e.args[1])}" if detailed else _one_line(e)
    return said, " 407 " in f" {said} "


def failure_reason(error: BaseException, location: BlobLocation) -> str:
    """Why a request failed, in one line for a message: the proxy's part when it was the proxy."""
    at_proxy = proxy_problem(error)
    if at_proxy is not None:
        proxy, variable = _proxy_of(location.account_url)
        return f"the proxy {proxy} ({variable}): {at_proxy[0]}"
    return f"{type(error).__name__}: {_one_line(error)[:200]}"


def _one_line(text: object) -> str:
    return (redact(text).strip().splitlines() or [""])[0][:300]


def _proxy_of(account_url: str) -> tuple[str, str]:
    """The proxy the environment names for `account_url` as host:port (never its password),
    and the variable that names it."""
    from urllib.request import getproxies

    scheme = urlparse(account_url).scheme
    proxy = getproxies().get(scheme, "")
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    where = f"{parsed.hostname}:{parsed.port}" if parsed.port else (parsed.hostname or "?")
    return where, f"{scheme.upper()}_PROXY"


def is_transient(error: BaseException) -> bool:
    """Whether a failed request may succeed if retried (connection trouble, timeouts, 5xx, 429)."""
    from azure.core.exceptions import (
        IncompleteReadError,
        ServiceRequestError,
        ServiceResponseError,
    )

    status = getattr(error, "status_code", None)
    if status is not None:
        return status in TRANSIENT_STATUS
    if certificate_problem(error) is not None:
        return False  # a certificate nobody trusts stays untrusted however often it is offered
    at_proxy = proxy_problem(error)
    if at_proxy is not None and at_proxy[1]:
        return False  # the proxy will refuse the same credentials again
    return isinstance(
        error,
        (
            ServiceRequestError,
            ServiceResponseError,
            IncompleteReadError,
            ConnectionError,
            TimeoutError,
            OSError,
        ),
    )


# Weights in formats other than safetensors, often published beside them (pytorch_model.bin,
# consolidated.pth, GGUF and ONNX exports): gigabytes that are neither loaded nor auxiliary.
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def is_other_weight_file(name: str) -> bool:
    """Whether a blob holds weights in a format blob2gpu does not load (by its suffix)."""
    return name.lower().endswith(OTHER_WEIGHT_SUFFIXES)


@dataclass(frozen=True)
class AuxBlob:
    """A non-weight file beside the shards (config.json, tokenizer files, the index, ...)."""

    name: str  # the blob's full name
    size: int
    etag: str
    archived: str | None = None  # why the service refuses its bytes now (Archive tier)


@dataclass
class BlobListing:
    """What a Blob URI resolved to: the plan, and the other files beside the weights."""

    plan: ShardPlan
    aux_blobs: list[AuxBlob]  # config, tokenizer, ... files (other weight formats left out)
    manifest_blob: str | None = None  # blob2gpu.manifest.json beside the shards, if any


def list_checkpoint(container_client: Any, location: BlobLocation, retry: Any) -> BlobListing:
    """List the checkpoint at `location`. Raises BlobNotFound, AccessDenied, InvalidIndex,
    SourceUnavailable (naming the missing shard) or StorageUnavailable."""
    path = location.path.rstrip("/")
    if path.endswith(".safetensors") or path.endswith(".index.json"):
        directory = posixpath.dirname(path)
    else:
        directory = path
    prefix = f"{directory}/" if directory else None

    def do_list() -> list[Any]:
        # One level only: a checkpoint's shards, index and aux files sit side by side, and a
        # container (or a prefix holding other runs' folders) may hold far more blobs below.
        from azure.storage.blob import BlobPrefix

        listed = list(container_client.walk_blobs(name_starts_with=prefix, delimiter="/"))
        folders = {b.name.rstrip("/") for b in listed if isinstance(b, BlobPrefix)}
        # A hierarchical-namespace account (ADLS Gen2) lists each folder as an empty blob too.
        return [
            b for b in listed
            if not isinstance(b, BlobPrefix) and not (b.size == 0 and b.name in folders)
        ]

    blobs = retry(do_list, f"listing {location.describe()}", None)
    by_name = {b.name: b for b in blobs}
    children = list(by_name)

    def ref(name: str) -> ShardRef:
        b = by_name[name]
        md5 = getattr(b.content_settings, "content_md5", None)
        return ShardRef(
            name=posixpath.basename(name),
            path=name,
            size=int(b.size),
            etag=b.etag,
            content_md5=bytes(md5) if md5 and len(md5) == 16 else None,
            archived=archived_reason(b),
        )

    weight_map = None
    if path.endswith(".safetensors"):
        if path not in by_name:
            raise BlobNotFound(f"{location.describe(path)} does not exist")
        shard_names = [path]
    else:
        index = path if path.endswith(".index.json") else posixpath.join(directory, INDEX_NAME)
        if path.endswith(".index.json") and index not in by_name:
            raise BlobNotFound(f"{location.describe(index)} does not exist")
        if index in by_name:
            raw = retry(
                lambda: (
                    container_client.get_blob_client(index)
                    .download_blob(etag=by_name[index].etag, match_condition=if_unchanged())
                    .readall()
                ),
                f"reading {location.describe(index)}",
                index,
            )
            weight_map = _parse_index(raw, index)
            files = sorted(set(weight_map.values()))
            shard_names = []
            for f in files:
                name = posixpath.join(directory, f) if directory else f
                if name not in by_name:
                    raise SourceUnavailable(
                        f"index '{index}' names shard '{f}', which is not in "
                        f"{location.describe()} under '{directory or '/'}'"
                    )
                shard_names.append(name)
        else:
            shard_names = sorted(n for n in children if n.endswith(".safetensors"))
            if not shard_names:
                raise BlobNotFound(
                    f"no .safetensors blobs and no {INDEX_NAME} under "
                    f"'{directory or '/'}' in {location.describe()}"
                )
    weights = set(shard_names)
    aux = [
        AuxBlob(n, int(by_name[n].size), by_name[n].etag, archived_reason(by_name[n]))
        for n in children
        if n not in weights and not n.endswith(".safetensors") and not is_other_weight_file(n)
    ]
    manifest_name = posixpath.join(directory, MANIFEST_NAME) if directory else MANIFEST_NAME
    plan = ShardPlan(
        uri=f"{location.account_url}/{location.container}/{location.path}",
        shards=tuple(ref(n) for n in shard_names),
        weight_map=weight_map,
        location=location,
    )
    return BlobListing(
        plan=plan, aux_blobs=aux, manifest_blob=manifest_name if manifest_name in by_name else None
    )


def if_unchanged() -> Any:
    """The SDK's match condition for If-Match on the etag passed beside it."""
    from azure.core import MatchConditions

    return MatchConditions.IfNotModified


def _parse_index(raw: bytes, name: str) -> dict[str, str]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidIndex(f"index '{name}' is not valid JSON: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and not v.startswith(".")
        for k, v in weight_map.items()
    ):
        raise InvalidIndex(f"index '{name}' has no 'weight_map' of tensor name to shard file name")
    return dict(weight_map)
