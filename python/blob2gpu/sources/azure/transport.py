"""The one adapter to azure-storage-blob's internals: a ranged GET whose body is left in the socket,
so the caller reads it straight into its own memory (a pinned staging slot, or the cpu arena)
with no Python `bytes` in between.

Why internals at all: the SDK's public download (`BlobClient.download_blob`) hands a body over as
`bytes` chunks and its `readinto()` copies each chunk again; at checkpoint sizes those copies cost
as much host memory bandwidth as the network delivers. What this module relies on, and why:

- `BlobClient._client.blob.download(range=, modified_access_conditions=, cls=)`: the SDK's
  generated Get Blob operation, sent through the client's own pipeline (credential, API version,
  request id, logging, and the transport open_container configured). It sends with stream=True,
  and a `cls` that returns the PipelineResponse keeps anything from reading the body.
  (`_client`: a private attribute of BlobClient.)
- `azure.storage.blob._generated.models.ModifiedAccessConditions(if_match=)`: how that operation
  takes If-Match, which pins every range to the etag seen at listing. (`_generated`: a private
  module.)
- `PipelineResponse.http_response.internal_response`: the requests.Response that azure-core's
  RequestsTransport wraps.
- `requests.Response.raw._fp`: urllib3's HTTPResponse keeps the http.client.HTTPResponse in `_fp`,
  whose `readinto()` fills the caller's memoryview from the socket (urllib3's own `readinto()`
  reads into a new `bytes` first). `raw.release_conn()` returns a connection whose body was read
  to its end to the pool. (`_fp`: a private attribute of urllib3.)

tests/integration/test_azure_transport_contract.py checks each of these (tests/support/
transport_probe.py) and makes a real ranged GET, against the oldest and the newest
azure-storage-blob that pyproject.toml admits; when an SDK release drops one of them, it names the
release and what is gone. No other module of blob2gpu names an SDK private.
"""

from __future__ import annotations

from typing import Any


class RangeResponse:
    """The answer to one ranged GET, its body still in the socket.

    One thread reads it; another may call close() to break a read that is blocked.
    """

    def __init__(self, http_response: Any) -> None:
        self._http = http_response  # requests.Response
        self._body = http_response.raw._fp  # http.client.HTTPResponse
        self.status: int = http_response.status_code

    def header(self, name: str) -> str | None:
        """The response header `name` (case-insensitive), or None when the answer has none."""
        value = self._http.headers.get(name)
        return None if value is None else str(value)

    def readinto(self, view: memoryview) -> int:
        """Read the next body bytes into the start of `view`; returns how many were read (0 when
        the body, or the connection, ended). Raises OSError (or http.client's errors) when the
        connection fails or times out."""
        return int(self._body.readinto(view))

    def release(self) -> None:
        """Hand the connection back to the pool for the next request (keep-alive). Only for a body
        read to its end."""
        self._http.raw.release_conn()

    def close(self) -> None:
        """Drop the connection: a body not read to its end cannot carry another request. Safe to
        call from another thread, and more than once."""
        self._http.close()


def open_range(blob: Any, start: int, end: int, etag: str | None) -> RangeResponse:
    """Send GET bytes [start, end) of `blob` (an azure.storage.blob.BlobClient), If-Match `etag`
    (a listed blob always has one).

    Returns the response with its body unread: the caller reads it, then release()s or close()s
    it. Raises what the SDK raises: azure.core.exceptions.HttpResponseError with `status_code` for
    an answer other than 200/206 (412 when the blob's etag is no longer `etag`, 416 when the range
    starts past its end), ServiceRequestError or ServiceResponseError when no answer came.
    """
    from azure.storage.blob._generated.models import ModifiedAccessConditions

    pipeline_response = blob._client.blob.download(
        range=f"bytes={start}-{end - 1}",
        modified_access_conditions=ModifiedAccessConditions(if_match=etag),
        cls=_keep_pipeline_response,
    )
    return RangeResponse(pipeline_response.http_response.internal_response)


def _keep_pipeline_response(pipeline_response: Any, _body: Any, _headers: Any) -> Any:
    return pipeline_response
