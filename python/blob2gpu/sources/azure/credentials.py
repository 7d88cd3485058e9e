"""Which credential a load uses: an explicit one, a SAS, the environment's account key or SAS,
or azure-identity's DefaultAzureCredential (made once per process); never a bearer token over
plain HTTP."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from blob2gpu.errors import InvalidArgument
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
