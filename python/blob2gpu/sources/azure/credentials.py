"""Which credential a load uses: an explicit one, a SAS, the environment's account key or SAS,
or azure-identity's DefaultAzureCredential (made once per process); never a bearer token over
plain HTTP, never an account key that is not base64. When the SAS expires, for messages."""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

from blob2gpu.errors import InvalidArgument, MalformedCredential
from blob2gpu.sources.azure.location import BlobLocation, parse_connection_string

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
    bearer token would cross plain HTTP, MalformedCredential when an account key is not base64.
    """
    env = os.environ if environ is None else environ
    credential: Any = None
    how = "anonymous"
    if explicit is not None:
        credential, how = explicit, "explicit credential"
        if isinstance(explicit, Mapping) and isinstance(explicit.get("account_key"), str):
            check_account_key(explicit["account_key"], "the credential argument", "account_key")
    elif location.sas:
        how = "SAS in the URI"
    elif env.get("AZURE_STORAGE_CONNECTION_STRING"):
        cs = parse_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])
        if cs.get("AccountKey"):
            check_account_key(cs["AccountKey"], "AZURE_STORAGE_CONNECTION_STRING", "AccountKey")
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
        check_account_key(env["AZURE_STORAGE_KEY"], "AZURE_STORAGE_KEY")
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
                f"refusing to send a bearer token ({how}) over plain HTTP to '{parsed.hostname}'",
                hint="use an https:// URL (emulators: serve HTTPS)",
            )
    return credential, how


def check_account_key(key: str, origin: str, field: str | None = None) -> None:
    """Raise MalformedCredential naming `origin` (and its `field`), never the key, when `key` is
    not base64, as every storage account key is: the SDK would fail to sign with it, or sign
    with other bytes (it drops characters outside base64's alphabet), and the service's refusal
    would hide why. Whitespace passes, as the SDK ignores it (a key read from a file ends in a
    newline)."""
    compact = "".join(key.split())
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        why = (
            "it has characters outside base64's alphabet (A-Z, a-z, 0-9, +, /, =)"
            if re.search(r"[^A-Za-z0-9+/=]", compact)
            else "its length or its '=' padding is wrong: it looks cut short"
        )
        hint = (
            f"copy the key again, whole, into {origin} (the storage account's Access keys in the "
            "portal, or az storage account keys list)"
        )
        where = f"{origin} ({field})" if field else origin
        raise MalformedCredential(
            f"the account key in {where} is not base64 ({why})", hint=hint
        ) from None


def sas_expiry(sas: str) -> str | None:
    """The expiry (`se`) a SAS states, as written (not secret: the signature is what grants
    access), or None when it states none."""
    values = parse_qs(sas.lstrip("?")).get("se")
    return values[0] if values else None


# A SAS's `se`: ISO 8601 in UTC, YYYY-MM-DD[Thh:mm[:ss[.fraction]]] and a zone (Z or +hh:mm).
_SAS_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?"
    r"(?:Z|([+-])(\d{2}):(\d{2}))?"
)


def sas_expired(expiry: str, now: datetime | None = None) -> bool:
    """Whether a SAS expiry (`se`) is in the past by this node's clock (or `now`); False when
    it does not parse."""
    m = _SAS_TIME.fullmatch(expiry.strip())
    if m is None:
        return False
    year, month, day, hour, minute, second, sign, zone_h, zone_m = m.groups()
    offset = timedelta(hours=int(zone_h or 0), minutes=int(zone_m or 0))
    try:
        at = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            tzinfo=timezone(-offset if sign == "-" else offset),
        )
    except ValueError:
        return False
    return at < (now or datetime.now(timezone.utc))
