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

import json
import os
import sys
from typing import Any

BLOB = "transport-probe/shard.bin"
SIZE = 256 * 1024


def probe(container: str | None) -> dict[str, Any]:
    """Run the contract check, then (with a container) the real GETs; returns the report above."""
    import azure.storage.blob
    from blob2gpu.sources.azure import transport

    result: dict[str, Any] = {
        "sdk": azure.storage.blob.__version__,
        "sdk_path": os.path.dirname(azure.storage.blob.__file__),
        "versions": transport.installed_versions(),
        "missing": transport.missing_internals(),
        "problems": [],
    }
    if container is not None and not result["missing"]:
        try:
            result["problems"] = ranged_gets(container)
        except Exception as e:
            result["problems"] = [f"{type(e).__name__}: {e}"]
    return result


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
        if bytes(got) != data[3:] or reader.bytes_read != SIZE - 3 or reader.requests != 1:
            problems.append(
                f"BlobRangeReader: {reader.requests} request(s), {reader.bytes_read} bytes, "
                f"equal to the blob's: {bytes(got) == data[3:]}"
            )
        blob.delete_blob()
    return problems


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else None)))
