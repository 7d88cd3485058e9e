"""What the core's range reader (blob2gpu._core.RangeClient) is told: where to connect (the
account's endpoint, the forward proxy, the CA bundle to trust) and, for each ranged GET, its
signed target and headers; and what its answers mean to the control plane. Python decides, C++
moves: the environment (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE) and the credential are read
here, the request is signed here (Shared Key, SAS or bearer token, as Azure's REST reference
describes it), the core only sends it and reads the body into the caller's memory, and
range_failure() turns a RangeResult that is not the bytes into an exception of the types
failures.py and retry.py already classify (status_code, x-ms-error-code, Retry-After; the
standard library's connection errors), so retries, throttling and error messages stay one
policy whichever reader fetched.

A load's GETs go this way when the native_http setting is on (its default):
container.open_container() makes the container's NativeHttp (the signer, and the RangeClients
of its endpoint: a Loader's, kept across its loads, or the container's own);
range_reader.BlobRangeReader reads the ranges through them, listing.py the listing's pages
(get_document), BlobContainer.read_small_blob the index and the manifest, and fetch_aux its
files in ranged GETs. Publishing and preflight stay on azure-storage-blob.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, unquote, urlparse

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument, MalformedCredential
from blob2gpu.redaction import redact
from blob2gpu.sources.azure.location import BlobLocation

# The REST API version the signed requests name (x-ms-version): one the service and Azurite
# both serve, with If-Match and x-ms-range on Get Blob as used here.
API_VERSION = "2021-08-06"
STORAGE_SCOPE = "https://storage.azure.com/.default"
TOKEN_REFRESH_MARGIN_SECONDS = 300.0  # a bearer token is renewed this long before it expires
NATIVE_HTTP_OFF = "BLOB2GPU_NATIVE_HTTP=0"  # the setting that reads through the SDK instead


@dataclass(frozen=True)
class RangeEndpoint:
    """Where a RangeClient connects, and how: the keyword arguments of its constructor."""

    host: str
    port: int
    tls: bool
    base_path: str  # the account's path prefix: '/devstoreaccount1' path-style, '' host-style
    ca_file: str | None = None
    proxy_host: str | None = None
    proxy_port: int = 0
    proxy_authorization: str | None = field(default=None, repr=False)  # holds a password

    def client_options(self) -> dict[str, Any]:
        """RangeClient(**options): everything but base_path."""
        options = asdict(self)
        del options["base_path"]
        return options


def range_endpoint(
    location: BlobLocation, environ: Mapping[str, str] | None = None
) -> RangeEndpoint:
    """The endpoint of `location`'s account as the core's range reader reaches it, decided the
    way requests decides for the SDK's path: HTTPS_PROXY / HTTP_PROXY (or ALL_PROXY) unless
    NO_PROXY names the host (a proxy's user:password becomes a Basic Proxy-Authorization), and
    the CA bundle from REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else OpenSSL's default locations,
    which honour SSL_CERT_FILE and SSL_CERT_DIR (where requests would take certifi's bundle:
    both hold the roots Azure's certificates chain to). Raises InvalidArgument for an account
    URL or proxy that cannot be used."""
    env = os.environ if environ is None else environ
    parsed = urlparse(location.account_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument(f"'{location.account_url}' is not an http(s) endpoint")
    tls = parsed.scheme == "https"
    port = parsed.port or (443 if tls else 80)
    ca_file = (env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or None) if tls else None
    proxy = _proxy_for(parsed.scheme, parsed.hostname, port, env)
    proxy_host, proxy_port, proxy_authorization = proxy or (None, 0, None)
    return RangeEndpoint(
        host=parsed.hostname,
        port=port,
        tls=tls,
        base_path=parsed.path.rstrip("/"),
        ca_file=ca_file,
        proxy_host=proxy_host,
        proxy_port=proxy_port,
        proxy_authorization=proxy_authorization,
    )


def _proxy_for(
    scheme: str, host: str, port: int, env: Mapping[str, str]
) -> tuple[str, int, str | None] | None:
    """(proxy host, port, Proxy-Authorization or None) for a request to host:port, or None to
    go direct."""
    proxies = _environment_proxies(env)
    proxy = proxies.get(scheme) or proxies.get("all")  # ALL_PROXY: requests falls back to it
    if not proxy:
        return None
    from requests.utils import should_bypass_proxies  # imported only when there is a proxy

    # requests' own NO_PROXY rule (suffixes, host:port, CIDR ranges, '*'): what the SDK path
    # obeys today.
    if should_bypass_proxies(f"{scheme}://{host}:{port}/", proxies.get("no", "")):
        return None
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if parsed.scheme != "http" or not parsed.hostname:
        raise InvalidArgument(
            f"{scheme.upper()}_PROXY must be an http:// proxy (host and port); the native "
            f"range reader speaks HTTP to its proxy (or set {NATIVE_HTTP_OFF} to read through "
            "azure-storage-blob)"
        )
    authorization = None
    if parsed.username is not None:
        pair = f"{unquote(parsed.username)}:{unquote(parsed.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode()
    return parsed.hostname, parsed.port or 80, authorization


def _environment_proxies(env: Mapping[str, str]) -> dict[str, str]:
    """{scheme: proxy URL, 'no': NO_PROXY} from *_PROXY variables, as urllib reads them: a
    lower-case variable wins over its upper-case twin, and an empty one unsets it."""
    proxies: dict[str, str] = {}
    for lower_case in (False, True):
        for name, value in env.items():
            if name.lower().endswith("_proxy") and name.islower() == lower_case:
                if value:
                    proxies[name[:-6].lower()] = value
                else:
                    proxies.pop(name[:-6].lower(), None)
    return proxies


class RequestSigner:
    """Makes the signed GETs of one container, target (path and query) and headers, for the
    core's RangeClient: a blob's ranges (get_into) and a level of the listing (get_document).
    Safe to share between threads."""

    def __init__(
        self,
        location: BlobLocation,
        credential: Any,
        base_path: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """credential: what sources.azure.credentials.resolve_credential chose: None (anonymous,
        or the SAS in the location), a SAS string, an account key ({'account_name',
        'account_key'}, or azure-core's AzureNamedKeyCredential / AzureSasCredential), or a
        token credential (get_token). base_path: the endpoint's (RangeEndpoint.base_path).
        Raises InvalidArgument for a credential it cannot sign with."""
        self._location = location
        self._base = base_path
        self._clock = clock
        self._sas = location.sas
        self._key: tuple[str, bytes] | None = None
        self._token_credential: Any = None
        self._token: tuple[str, float, float] | None = None  # (token, expires_on, refresh_on)
        self._token_lock = threading.Lock()  # one thread asks the credential; the others wait
        if credential is None:
            pass
        elif isinstance(credential, str):
            self._sas = credential.lstrip("?")
        elif isinstance(credential, Mapping) and "account_key" in credential:
            name = str(credential.get("account_name") or location.account)
            self._key = (name, _account_key(credential["account_key"], location))
        elif hasattr(credential, "named_key"):  # AzureNamedKeyCredential
            named = credential.named_key
            self._key = (named.name, _account_key(named.key, location))
        elif hasattr(credential, "signature"):  # AzureSasCredential
            self._sas = str(credential.signature).lstrip("?")
        elif hasattr(credential, "get_token"):
            self._token_credential = credential
        else:
            raise InvalidArgument(
                f"the native range reader cannot sign with a {type(credential).__name__}"
            )

    @property
    def sends_token(self) -> bool:
        """Whether the requests carry a bearer token (which must never cross plain HTTP)."""
        return self._token_credential is not None

    def path(self, blob: str) -> str:
        """The percent-encoded request path of `blob` (no query)."""
        container = quote(self._location.container, safe="")
        return f"{self._base}/{container}/{quote(blob, safe='/~')}"

    def range_get(
        self, blob: str, start: int, end: int, etag: str | None
    ) -> tuple[str, list[tuple[str, str]]]:
        """(target, headers) of GET bytes [start, end) of `blob`, If-Match `etag` when given,
        signed with the credential. Raises what the token credential raises when it cannot get
        a token."""
        if not 0 <= start < end:
            raise InvalidArgument(f"an empty or negative range [{start}, {end})")
        return self._signed(self.path(blob), [], etag, f"bytes={start}-{end - 1}")

    def list_get(
        self, prefix: str | None, marker: str | None, max_results: int
    ) -> tuple[str, list[tuple[str, str]]]:
        """(target, headers) of List Blobs of the container: one level ('/' the delimiter)
        under `prefix`, the page after `marker`, at most `max_results` entries."""
        query = [("comp", "list"), ("delimiter", "/"), ("maxresults", str(max_results))]
        query += [("prefix", prefix)] if prefix else []
        query += [("marker", marker)] if marker else []
        query.append(("restype", "container"))
        container = quote(self._location.container, safe="")
        return self._signed(f"{self._base}/{container}", query, None, None)

    def _signed(
        self, path: str, query: list[tuple[str, str]], etag: str | None, byte_range: str | None
    ) -> tuple[str, list[tuple[str, str]]]:
        """(target, headers) of a GET of `path` with `query` (decoded names and values),
        signed with the credential."""
        headers = [
            ("x-ms-date", formatdate(self._clock(), usegmt=True)),
            ("x-ms-version", API_VERSION),
        ]
        if byte_range is not None:
            headers.append(("x-ms-range", byte_range))
        if etag is not None:
            headers.append(("If-Match", etag))
        if self._key is not None:
            headers.append(("Authorization", self._shared_key(path, query, headers)))
        elif self._token_credential is not None:
            headers.append(("Authorization", f"Bearer {self._bearer_token()}"))
        parts = [f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in query]
        if self._sas and self._key is None:
            parts.insert(0, self._sas)
        return (f"{path}?{'&'.join(parts)}" if parts else path), headers

    def _shared_key(
        self, path: str, query: list[tuple[str, str]], headers: list[tuple[str, str]]
    ) -> str:
        """The Shared Key Authorization value of a GET of `path` with `query` and `headers`
        (Azure's "Authorize with Shared Key": the standard headers in their fixed order, then
        the x-ms- headers sorted, then /ACCOUNT/PATH and the query's parameters, sorted, one
        line each)."""
        account, key = self._key  # type: ignore[misc]
        named = {name.lower(): value.strip() for name, value in headers}
        standard = [
            "content-encoding",
            "content-language",
            "content-length",
            "content-md5",
            "content-type",
            "date",
            "if-modified-since",
            "if-match",
            "if-none-match",
            "if-unmodified-since",
            "range",
        ]
        lines = ["GET", *(named.get(name, "") for name in standard)]
        canonical = "".join(
            f"{name}:{value}\n" for name, value in sorted(named.items()) if name.startswith("x-ms-")
        )
        resource = f"/{account}{path}" + "".join(
            f"\n{name.lower()}:{value}" for name, value in sorted(query, key=lambda q: q[0].lower())
        )
        to_sign = "\n".join(lines) + "\n" + canonical + resource
        digest = hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).digest()
        return f"SharedKey {account}:{base64.b64encode(digest).decode()}"

    def _bearer_token(self) -> str:
        """The token to send, asked of the credential again when azure-core's bearer policy
        would: none yet, past its refresh_on (get_token_info's), or within
        TOKEN_REFRESH_MARGIN_SECONDS of its expiry."""
        with self._token_lock:
            token = self._token
            now = self._clock()
            if (
                token is None
                or token[1] - TOKEN_REFRESH_MARGIN_SECONDS <= now
                or 0 < token[2] <= now
            ):
                if hasattr(self._token_credential, "get_token_info"):  # azure-core >= 1.31
                    access = self._token_credential.get_token_info(STORAGE_SCOPE)
                else:
                    access = self._token_credential.get_token(STORAGE_SCOPE)
                refresh_on = float(getattr(access, "refresh_on", None) or 0)
                token = self._token = (str(access.token), float(access.expires_on), refresh_on)
            return token[0]


def _account_key(key: str, location: BlobLocation) -> bytes:
    """The bytes of an account key (base64; whitespace ignored, as the SDK does). Raises
    MalformedCredential, naming the account, never the key, when it is not base64: keys the
    environment gives are checked before (credentials.check_account_key), one handed over in
    an SDK object is first decoded here."""
    try:
        return base64.b64decode("".join(str(key).split()), validate=True)
    except (binascii.Error, ValueError):
        hint = "copy the account key again, whole (it is base64, 88 characters for Azure's)"
        raise MalformedCredential(
            f"requests to {location.describe()} could not be signed with the account key: it is "
            "malformed (not base64)",
            hint=hint,
        ) from None


# -- what an answer that is not the bytes means ------------------------------------------------
class _Headers(dict[str, str]):
    """A response's headers, read case-insensitively (as azure-core's are)."""

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class _Response:
    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = _Headers((name.lower(), value) for name, value in reversed(headers))


class RangeHttpError(Exception):
    """The server answered a GET of the core's (a range, a listing page) with a status other
    than 2xx: the fields failures.py
    reads from azure-core's HttpResponseError (status_code, error_code, reason, response
    headers), none from a message. `message`: the service's own (the error body's <Message>,
    else the HTTP reason); the text also carries the body's AuthenticationErrorDetail (what the
    service signed, to compare with what was sent), redacted like everything taken from the
    body: Azure's quotes the request's signature."""

    def __init__(self, result: _core.RangeResult) -> None:
        reason = redact(result.reason)
        detail = error_element(result.error_body, "AuthenticationErrorDetail")
        super().__init__(
            f"HTTP {result.status} {reason}".rstrip() + (f" ({detail})" * bool(detail))
        )
        self.status_code = result.status
        self.reason = reason
        self.message = error_element(result.error_body, "Message") or reason
        self.error_code = result.header("x-ms-error-code")
        self.response = _Response(result.headers)


def error_element(body: bytes, name: str) -> str:
    """The text of element `name` of an Azure error body (XML), unescaped and redacted; '' when
    it has none."""
    found = re.search(rb"<%s>(.*?)</%s>" % (name.encode(), name.encode()), body, re.DOTALL)
    if found is None:
        return ""
    return redact(html.unescape(found.group(1).decode("utf-8", "replace"))).strip()


class RangeMismatch(Exception):
    """A 2xx answer whose body is not the range asked for (another size, another range): the
    blob changed since it was listed. `total_size`: its size now, or -1 when it did not say."""

    def __init__(self, result: _core.RangeResult) -> None:
        super().__init__(result.detail)
        self.total_size = result.total_size


class ConnectTimeoutError(TimeoutError):
    """No TCP connection within connect_timeout_seconds (the name failures.connection_problem
    knows, as urllib3's)."""


class ProxyError(OSError):
    """The forward proxy failed or refused the tunnel: (what failed, why), as urllib3's
    ProxyError carries them (failures.proxy_problem reads both); status_code 407 when it refused
    the proxy credentials."""

    status_code: int | None = None


def range_failure(result: _core.RangeResult) -> Exception | None:
    """None when `result` is the whole answer (result.ok: the range, or the document); else the
    exception it amounts to, of the types sources.azure.failures classifies: RangeHttpError for
    an error status (412 when the etag no longer matches), RangeMismatch,
    ssl.SSLCertVerificationError, ProxyError (status_code 407 when the proxy refused its
    credentials; wrapping the connection error below when the proxy could not be reached),
    ConnectionRefusedError, socket.gaierror, ConnectTimeoutError, TimeoutError,
    ConnectionResetError, ConnectionError (a malformed answer), ConnectionAbortedError (the
    client was closed)."""
    F = _core.FetchFailure
    failure, detail = result.failure, result.detail
    if failure == F.NONE:
        if result.ok:
            return None
        return RangeHttpError(result)
    if failure == F.RANGE_MISMATCH:
        return RangeMismatch(result)
    if failure == F.TLS_VERIFY:
        error = ssl.SSLCertVerificationError(1, detail)
        error.verify_message = detail
        return error
    if failure == F.PROXY_REFUSED:
        proxy = ProxyError("Unable to connect to proxy", OSError(detail))
        if result.status == 407:
            proxy.status_code = 407
        return proxy
    simple: dict[_core.FetchFailure, type[Exception]] = {
        F.CONNECT_REFUSED: ConnectionRefusedError,
        F.DNS: socket.gaierror,
        F.CONNECT_TIMEOUT: ConnectTimeoutError,
        F.CONNECT_FAILED: ConnectionError,
        F.TLS_HANDSHAKE: ssl.SSLError,
        F.TIMEOUT: TimeoutError,
        F.RESET: ConnectionResetError,
        F.MALFORMED: ConnectionError,
        F.CANCELLED: ConnectionAbortedError,
    }
    connection = simple.get(failure, ConnectionError)(detail)
    if result.at_proxy:  # reaching the proxy, or in its tunnel: the proxy is what failed
        return ProxyError("Unable to connect to proxy", connection)
    return connection
