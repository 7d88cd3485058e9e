"""What a failed storage request means: the SDK's exceptions mapped to blob2gpu's typed errors
(naming the place, never a secret), whether a retry may help, what the service's denial codes
mean, and the proxy, certificate and Archive-tier problems behind a failure."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from blob2gpu import phrasing
from blob2gpu.errors import (
    AccessDenied,
    Blob2GpuError,
    BlobArchived,
    BlobNotFound,
    MalformedCredential,
    ProxyAuthenticationRefused,
    SourceUnavailable,
    StorageUnavailable,
)
from blob2gpu.redaction import redact
from blob2gpu.sources.azure.credentials import sas_expired
from blob2gpu.sources.azure.location import BlobLocation

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def storage_error(
    error: BaseException, location: BlobLocation, blob: str | None = None, what: str = "request"
) -> Blob2GpuError:
    """Map an azure-core/storage exception to a blob2gpu error naming the place, without secrets.

    Transient failures come back as StorageUnavailable; callers that retry test is_transient first.
    """
    status = getattr(error, "status_code", None)
    code = getattr(error, "error_code", None)
    place = location.describe(blob)
    from azure.core.exceptions import ClientAuthenticationError

    if status is None and type(error).__name__ == "AzureSigningError":
        # The SDK could not sign with the account key (resolve_credential checks the keys it
        # reads; this is one handed over in an object of the SDK's): no token is involved.
        hint = "copy the account key again, whole (it is base64, 88 characters for Azure's)"
        return MalformedCredential(
            f"{what}: the request to {place} could not be signed with the account key: it is "
            f"malformed ({_one_line(error)})",
            blob=blob,
            hint=hint,
        )
    if status is None and isinstance(error, ClientAuthenticationError):
        # The credential could not get a token (DefaultAzureCredential found no identity, an
        # expired client secret): nothing a retry changes. Its first line says which.
        hint = (
            "give the pod a workload or managed identity with 'Storage Blob Data Reader', or set "
            "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY or a SAS"
        )
        return AccessDenied(
            f"{what}: no token to reach {place} ({_one_line(error)})", blob=blob, hint=hint
        )
    at_proxy = proxy_problem(error)
    if at_proxy is not None:
        said, refused = at_proxy
        proxy, variable = _proxy_of(location.account_url)
        if refused:
            hint = f"check the user and password in {variable}"
            return ProxyAuthenticationRefused(
                f"{what}: the proxy {proxy} refused its credentials (HTTP 407) on the way to "
                f"{place}",
                blob=blob,
                hint=hint,
            )
        return StorageUnavailable(
            f"{what}: the proxy {proxy} failed on the way to {place} ({said})",
            hint=f"check that it is reachable and allows this host ({variable}), or leave the "
            "host out with NO_PROXY",
        )
    untrusted = certificate_problem(error)
    if untrusted is not None:
        host = urlparse(location.account_url).hostname
        return SourceUnavailable(
            f"{what}: the TLS certificate of '{host}' is not trusted ({untrusted}) reaching "
            f"{place}",
            hint="install the CA that signed it, or point REQUESTS_CA_BUNDLE at it",
        )
    code = getattr(code, "value", code)  # the SDK hands some codes over as an enum member
    # The generated operations leave the code in the response's header only.
    code = code or response_header(error, "x-ms-error-code")
    detail = f"HTTP {status}" + (f" {code}" if code else "") if status else type(error).__name__
    if code in ARCHIVE_ERROR_CODES:
        why = "being rehydrated" if code == "BlobBeingRehydrated" else "in the Archive tier"
        return archived_error(location, {blob or "?": why}, what)
    if status == 404:
        # Unsigned, a private container answers 404 as if nothing were there.
        unsigned = f"{BlobNotFound.remedy}, or {NO_CREDENTIAL}" if location.anonymous else None
        if code == "ContainerNotFound" or blob is None:
            place = location.describe()
        return BlobNotFound(f"{what}: {place} does not exist ({detail})", hint=unsigned)
    if status in (401, 403):
        meaning, check = DENIALS.get(code or "", (None, DEFAULT_DENIAL_CHECK))
        if location.anonymous:
            meaning, check = "no credential was found: the request went unsigned", NO_CREDENTIAL
        expiry = location.sas_expiry
        if expiry is not None and sas_expired(expiry):  # what the service's code cannot say
            meaning = f"the SAS expired at {expiry}"
            check = "the SAS's expiry: make a new one with a later se= (and this node's clock)"
        return AccessDenied(
            f"{what}: access to {place} was denied ({detail}"
            + (f": {meaning}" if meaning else "")
            + ")",
            blob=blob,
            hint=check if location.anonymous else f"check {check}",
        )
    if status in TRANSIENT_STATUS or status is None:
        return StorageUnavailable(f"{what}: {place} is unavailable ({detail}: {_said(error)})")
    return SourceUnavailable(f"{what}: {place} failed ({detail}: {_said(error)})")


# What a load without any credential should be given.
NO_CREDENTIAL = (
    "give a credential: AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY, a SAS (in the URI or "
    "AZURE_STORAGE_SAS_TOKEN), or azure-identity for a workload or managed identity "
    "(pip install 'blob2gpu[identity]')"
)
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


# What Azure says when an account's bandwidth, not its request rate, is over its limit: 503 with
# x-ms-error-code ServerBusy, and "Egress is over the account limit." (or "Ingress ...") as the
# HTTP reason and the error body's message; over the request rate, the same code with "Operations
# per second is over the account limit." (its documented texts).
BANDWIDTH_THROTTLING = ("Egress is over the account limit.", "Ingress is over the account limit.")


def is_throttled(error: BaseException) -> bool:
    """Whether `error` is the account shedding load (429, 503 ServerBusy): a request to send
    again later, more patiently than another transient failure."""
    return getattr(error, "status_code", None) in (429, 503)


def throttled_by_bandwidth(error: BaseException) -> bool:
    """Whether a throttled answer was for the account's bytes per second, not its requests per
    second: larger ranges do not help then.

    The one place that reads what the service said rather than a code: Azure answers ServerBusy
    to both kinds, so its message is the only signal. Read as narrowly as it can be: a 503 whose
    error code (x-ms-error-code, when the error exposes it) is ServerBusy and whose HTTP reason,
    body message (the SDK's model) or message's first line starts with a documented text. Any
    other answer (429, another code, a text unknown or changed) is request-rate throttling: the
    safe default (ranges grow, a pace of requests rather than bytes)."""
    if getattr(error, "status_code", None) != 503:
        return False
    code = response_header(error, "x-ms-error-code") or getattr(error, "error_code", None)
    if code is not None and str(getattr(code, "value", code)) != "ServerBusy":
        return False
    message = getattr(error, "message", None)
    said = (
        getattr(error, "reason", None),
        getattr(getattr(error, "model", None), "message", None),
        message.split("\n", 1)[0] if isinstance(message, str) else None,
    )
    return any(isinstance(s, str) and s.strip().startswith(BANDWIDTH_THROTTLING) for s in said)


def _said(error: BaseException) -> str:
    """What the service or the transport said, in one short line: the service's message (the
    HTTP reason Azure sends) rather than the whole XML error body."""
    reason = getattr(error, "reason", None) if getattr(error, "status_code", None) else None
    return _one_line(reason if isinstance(reason, str) and reason else error)


# The service's codes for reading a blob of the Archive tier, or one still being rehydrated.
ARCHIVE_ERROR_CODES = ("BlobArchived", "BlobBeingRehydrated")


def archived_reason(tier: str | None, archive_status: str | None) -> str | None:
    """Why the service refuses a listed blob's bytes (its access tier, its archive status), or
    None when it serves them. A blob being rehydrated stays in the Archive tier until
    rehydration completes."""
    if str(tier or "").lower() != "archive":
        return None
    return f"being rehydrated ({archive_status})" if archive_status else "in the Archive tier"


def archived_error(
    location: BlobLocation, blobs: Mapping[str, str], what: str | None = None
) -> BlobArchived:
    """BlobArchived naming `blobs` (blob name -> archived_reason) and what would make them
    readable."""
    named = [f"'{b}' ({why})" for b, why in blobs.items()]
    shown = phrasing.first_of(named, shown=8)
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
    """Why a request failed, in one line for a message (a load's, after its retries; preflight's):
    the proxy's part when it was the proxy, what the connection met when it never got an answer
    (refused, a name that does not resolve, no answer in time), a certificate nobody trusts, else
    the exception's first line."""
    at_proxy = proxy_problem(error)
    if at_proxy is not None:
        proxy, variable = _proxy_of(location.account_url)
        unreached_proxy = _unreachable(error)
        if unreached_proxy is not None:  # what reached nothing was the proxy, not the endpoint
            return f"the proxy {proxy} ({variable}) cannot be reached: {unreached_proxy}"
        return f"the proxy {proxy} ({variable}): {at_proxy[0]}"
    unreached = connection_problem(error, location)
    if unreached is not None:
        return unreached[0]
    untrusted = certificate_problem(error)
    if untrusted is not None:
        host = urlparse(location.account_url).hostname
        return f"the TLS certificate of '{host}' is not trusted ({untrusted})"
    return f"{type(error).__name__}: {_one_line(error)}"


def _unreachable(error: BaseException) -> str | None:
    """What a connection that never got an answer met (refused, a name that does not resolve, no
    answer in time), by the exception types down the cause chain; None otherwise."""
    import socket

    for e in _causes(error):
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "its name does not resolve"
        if type(e).__name__ == "ConnectTimeoutError":  # urllib3: no answer to the connection
            return "no answer within connect_timeout_seconds"
    return None


def connection_problem(error: BaseException, location: BlobLocation) -> tuple[str, str] | None:
    """(what happened, what to check) when the request never reached a server (_unreachable):
    the endpoint refused the connection (nothing listens there), its name does not resolve, or
    it did not answer the connection in time; None otherwise."""
    unreached = _unreachable(error)
    if unreached is None:
        return None
    parsed = urlparse(location.account_url)
    host = parsed.hostname or "?"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    endpoint = f"{host}:{port}"
    if unreached == "connection refused":
        return (
            f"connection refused: nothing listens at {endpoint}",
            f"check the endpoint ({location.account_url}, from the URI or the connection "
            "string) and that the storage service (or emulator) runs there",
        )
    if unreached == "its name does not resolve":
        return (
            f"the name '{host}' does not resolve",
            "check the account name in the URI or connection string, and this node's DNS "
            "(a private endpoint needs its privatelink zone)",
        )
    return (
        f"no answer from {endpoint} within connect_timeout_seconds",
        "check the network path to the account (firewall, private endpoint, proxy)",
    )


def retry_advice(error: BaseException, location: BlobLocation) -> str:
    """What to do once retries of `error` are spent: retry settings only for throttling and
    5xx (the service may answer later), else what fits the cause."""
    status = getattr(error, "status_code", None)
    if is_throttled(error):
        return (
            "the account is throttling or busy: raise retry_throttled_seconds (or "
            "retry_max_attempts), or spread the load (fewer nodes starting at once)"
        )
    if status in TRANSIENT_STATUS:
        return "raise retry_max_attempts, or check the storage account's health"
    if proxy_problem(error):
        return "check the proxy, or leave this host out with NO_PROXY"
    unreached = connection_problem(error, location)
    if unreached is not None:
        return unreached[1]
    return "check the network path to the account (resets and read timeouts: read_timeout_seconds)"


def _one_line(text: object, limit: int = 300) -> str:
    """The first line of `text`, without secrets, cut at a word boundary when over `limit`."""
    line = (redact(text).strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + " ..."


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
