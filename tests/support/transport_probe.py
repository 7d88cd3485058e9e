"""Exercise blob2gpu's transport adapter (sources/azure/transport.py) with whichever
azure-storage-blob this interpreter imports; run as a script, so that an older SDK can be put
first on PYTHONPATH:

    python transport_probe.py                 the contract check alone (no request)
    python transport_probe.py CONTAINER       and real ranged GETs against the storage account
                                              AZURE_STORAGE_CONNECTION_STRING names (Azurite)

Prints one JSON object: the SDK version imported (`sdk`), every version the adapter relies on
(`versions`), the internals the SDK lacks (`missing`) and what went wrong with the real GETs
(`problems`); a probe that works has both lists empty.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

BLOB = "transport-probe/shard.bin"
SIZE = 256 * 1024


def probe(container: str | None) -> dict[str, Any]:
    """Run the contract check, then (with a container) the real GETs; returns the report above."""
    import azure.storage.blob

    result: dict[str, Any] = {
        "sdk": azure.storage.blob.__version__,
        "sdk_path": os.path.dirname(azure.storage.blob.__file__),
        "versions": installed_versions(),
        "missing": missing_internals(),
        "problems": [],
    }
    if container is not None and not result["missing"]:
        try:
            result["problems"] = ranged_gets(container)
        except Exception as e:
            result["problems"] = [f"{type(e).__name__}: {e}"]
    return result


def missing_internals() -> list[str]:
    """What transport.open_range and RangeResponse rely on that the installed azure-storage-blob,
    azure-core, requests or urllib3 lacks: one line per missing piece, naming it; empty when all
    of it is there. Sends no request."""
    checks: list[tuple[str, Callable[[], object]]] = [
        (
            "azure.storage.blob._generated.models.ModifiedAccessConditions(if_match=...)",
            _check_access_conditions,
        ),
        (
            "BlobClient._client.blob.download(range=, modified_access_conditions=, cls=)",
            _check_download_operation,
        ),
        (
            "azure.core RequestsTransportResponse.internal_response (the requests.Response)",
            _check_internal_response,
        ),
        ("urllib3 HTTPResponse._fp.readinto() and release_conn()", _check_urllib3_body),
    ]
    missing = []
    for what, check in checks:
        try:
            problem = check()
        except Exception as e:  # whatever broke, the message names the piece
            problem = f"{type(e).__name__}: {e}"
        if problem:
            missing.append(f"{what}: {problem}")
    return missing


def installed_versions() -> str:
    """The installed versions of the packages transport.py relies on, for messages."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("azure-storage-blob", "azure-core", "requests", "urllib3"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} (not installed)")
    return ", ".join(found)


def _check_access_conditions() -> str | None:
    from azure.storage.blob._generated.models import ModifiedAccessConditions

    conditions = ModifiedAccessConditions(if_match='"0x1"')
    return None if conditions.if_match == '"0x1"' else "if_match is not kept"


def _check_download_operation() -> str | None:
    from azure.storage.blob import BlobClient

    blob = BlobClient("https://account.blob.core.windows.net", "container", "blob")
    download = blob._client.blob.download
    parameters = inspect.signature(download).parameters
    lacking = [p for p in ("range", "modified_access_conditions") if p not in parameters]
    if lacking:
        return f"no parameter {', '.join(lacking)}"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return "takes no **kwargs, so no cls="
    # A `cls` hook is what keeps the deserializer from touching the body (the generated code
    # pops it from kwargs); a real GET (the contract test's) checks the body is still unread.
    if not re.search(r"pop\(\s*[\"']cls[\"']", inspect.getsource(download)):
        return "no longer takes cls= (the hook that returns the pipeline response)"
    return None


def _check_internal_response() -> str | None:
    import requests
    from azure.core.pipeline.transport import HttpRequest, RequestsTransportResponse

    answer = requests.Response()
    wrapped = RequestsTransportResponse(HttpRequest("GET", "https://account/"), answer)
    return None if wrapped.internal_response is answer else "holds another object"


def _check_urllib3_body() -> str | None:
    import urllib3

    raw = urllib3.HTTPResponse(body=io.BytesIO(b"body"), preload_content=False)
    into = bytearray(4)
    if raw._fp is None:
        return "no _fp"
    if raw._fp.readinto(memoryview(into)) != 4 or into != b"body":
        return "_fp.readinto() did not fill the buffer"
    return None if callable(getattr(raw, "release_conn", None)) else "no release_conn()"


def ranged_gets(container_name: str) -> list[str]:
    """GETs through the client blob2gpu builds: a range read by transport.open_range, a second
    one on the released connection, a stale etag, and one BlobRangeReader read through the SDK
    (native_http off: the path this contract guards); returns what did not behave."""
    from azure.core.exceptions import HttpResponseError
    from blob2gpu.settings import resolve
    from blob2gpu.sources.azure.container import open_container
    from blob2gpu.sources.azure.range_reader import BlobRangeReader
    from blob2gpu.sources.azure.transport import open_range
    from blob2gpu.sources.plan import ShardRef

    data = bytes(range(256)) * (SIZE // 256)
    problems = []
    settings = resolve({"native_http": False})
    with open_container(f"az://{container_name}/transport-probe", settings) as container:
        blob = container.client.get_blob_client(BLOB)
        etag = blob.upload_blob(data, overwrite=True)["etag"]
        for start, end in ((1000, 5000), (SIZE - 7, SIZE)):  # the second reuses the connection
            response = open_range(blob, start, end, etag)
            got = bytearray(end - start)
            view, pos = memoryview(got), 0
            while pos < len(got) and (n := response.readinto(view[pos:])):
                pos += n
            response.release()
            expected_range = f"bytes {start}-{end - 1}/{SIZE}"
            if response.status != 206 or response.header("content-range") != expected_range:
                problems.append(
                    f"GET {start}-{end - 1}: HTTP {response.status}, Content-Range "
                    f"{response.header('content-range')!r}, expected 206 and {expected_range!r}"
                )
            if bytes(got) != data[start:end]:
                problems.append(f"GET {start}-{end - 1}: the bytes read are not the blob's")
        try:
            open_range(blob, 0, 8, '"0x0000000000000000"').close()
            problems.append("a stale etag was not refused")
        except HttpResponseError as e:
            if e.status_code != 412:
                problems.append(f"a stale etag got HTTP {e.status_code}, expected 412")
        reader = BlobRangeReader(container)
        ref = ShardRef(name="shard.bin", path=BLOB, size=SIZE, etag=etag)
        got = bytearray(SIZE - 3)
        reader.read_into(ref, 3, memoryview(got))
        if bytes(got) != data[3:] or reader.requests != 1:
            problems.append(
                f"BlobRangeReader: {reader.requests} request(s), bytes equal to the blob's: "
                f"{bytes(got) == data[3:]}"
            )
        blob.delete_blob()
    return problems


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else None)))
