"""Where a checkpoint lives in Azure Blob Storage: the URI forms, connection strings and the
emulators' development account, parsed into a BlobLocation (never holding a secret in its URL).

A URI names one blob, a prefix holding shards (with or without model.safetensors.index.json), or
the index itself:
    az://CONTAINER/PREFIX              account from AZURE_STORAGE_CONNECTION_STRING or
                                       AZURE_STORAGE_ACCOUNT_NAME
    https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS]
    http://127.0.0.1:PORT/ACCOUNT/CONTAINER/PREFIX   path-style (emulators, private endpoints)
    abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/PREFIX   the Hadoop forms (Databricks, Fabric,
                                       Synapse; also abfs, wasbs, wasb) and https://ACCOUNT.dfs...
                                       URLs: read through the account's blob endpoint over HTTPS
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlparse

from blob2gpu.errors import InvalidArgument
from blob2gpu.redaction import redact

HADOOP_SCHEMES = ("abfss", "abfs", "wasbs", "wasb")
BLOB_SCHEMES = ("az", "http", "https", *HADOOP_SCHEMES)


@dataclass(frozen=True)
class BlobLocation:
    """Where a checkpoint lives. `account_url` never carries a SAS; `sas` holds it apart."""

    account_url: str
    account: str
    container: str
    path: str  # a blob name, or a prefix ('' for the whole container)
    sas: str | None = None
    # The expiry (se=) of the SAS the requests are signed with, wherever it came from (set once
    # the credential is chosen): a refusal after it names it. Not a secret.
    sas_expiry: str | None = None
    # No credential was given or found (set once it is chosen): requests go unsigned, and a
    # refusal says so.
    anonymous: bool = False

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
            raise InvalidArgument(
                f"'{redact(uri)}' names no container", hint="use az://CONTAINER/PREFIX"
            )
        if env.get("AZURE_STORAGE_CONNECTION_STRING"):
            cs = parse_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])
            account_url, account = _account_url_from_connection_string(cs)
        elif env.get("AZURE_STORAGE_ACCOUNT_NAME"):
            account = env["AZURE_STORAGE_ACCOUNT_NAME"]
            account_url = f"https://{account}.blob.core.windows.net"
        else:
            raise InvalidArgument(
                "az:// URIs need the storage account",
                hint="set AZURE_STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_CONNECTION_STRING)",
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
            f"'{redact(uri)}' names a blob snapshot or version: blob2gpu loads the current blobs",
            hint="copy that version to its own prefix to load it",
        )
    if "sig" not in keys:
        raise InvalidArgument(
            f"'{redact(uri)}' has a query that is not a SAS token (no sig=): drop it, or pass "
            "the whole SAS"
        )
    return query
