"""The core's range readers (blob2gpu._core.RangeClient) a Blob load reads through, and who owns
them. One RangeClient serves one reader (one load's threads, each on a keep-alive connection of
the client's own pool) at a time, lent from a RangeClients of its endpoint: a Loader's, so that
a later load from the same account takes the connections (and TLS sessions) an earlier one left
open, or a container's own, closed with it. A reader that must break its reads in flight closes
its client (RangeClient.close() breaks every request on it, for good) and does not give it back:
lending each client to one reader is what lets one load stop without touching another's.

Why not a client per connection: each RangeClient over HTTPS loads the trusted certificates
once (tens of milliseconds of CPU); a load shares one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from blob2gpu import _core
from blob2gpu.errors import InvalidArgument, SourceUnavailable
from blob2gpu.sources.azure.native_requests import (
    NATIVE_HTTP_OFF,
    RangeEndpoint,
    RequestSigner,
    range_failure,
)

log = logging.getLogger("blob2gpu")
T = TypeVar("T")

IDLE_CLIENTS_KEPT = 4  # clients of one endpoint kept for later readers (one per load at a time)


class RangeClients:
    """The RangeClients of one endpoint, each lent to one reader at a time; close() closes them
    all, lent or idle. Safe to share between threads."""

    def __init__(
        self,
        endpoint: RangeEndpoint,
        connect_timeout: float,
        read_timeout: float,
        connections: int,
    ) -> None:
        """connections: the keep-alive connections each client keeps (a load's concurrency)."""
        self.endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._connections = connections
        self._lock = threading.Lock()
        self._idle: list[_core.RangeClient] = []
        self._lent: list[_core.RangeClient] = []

    def lend(self) -> _core.RangeClient:
        """An idle client (its connections open), else a new one. Raises SourceUnavailable when
        HTTPS needs OpenSSL or a CA bundle that cannot be loaded, InvalidArgument for an
        endpoint the core refuses."""
        with self._lock:
            if self._idle:
                client = self._idle.pop()
                self._lent.append(client)
                return client
        try:
            client = _core.RangeClient(
                **self.endpoint.client_options(),
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                pool_size=self._connections,
            )
        except SourceUnavailable as e:
            # The core names what it could not load (libssl, the CA bundle).
            raise SourceUnavailable(
                f"the native range reader cannot reach {self.endpoint.host}: {e} (or set "
                f"{NATIVE_HTTP_OFF} to read through azure-storage-blob)"
            ) from None
        with self._lock:
            self._lent.append(client)
        return client

    def give_back(self, client: _core.RangeClient, closed: bool = False) -> None:
        """A reader is done with `client`: kept for the next one unless `closed` (the reader
        closed it) or enough are kept already."""
        with self._lock:
            self._lent = [c for c in self._lent if c is not client]
            if not closed and len(self._idle) < IDLE_CLIENTS_KEPT:
                self._idle.append(client)
                return
        client.close()

    def close(self) -> None:
        """Close every client, idle or lent (a lent one's requests in flight end CANCELLED)."""
        with self._lock:
            clients, self._idle, self._lent = self._idle + self._lent, [], []
        for client in clients:
            client.close()


def log_request(
    client: _core.RangeClient, target: str, result: _core.RangeResult, error: Exception | None
) -> None:
    """Log one request of the core's at DEBUG, as urllib3 logs the SDK's (the target's SAS is
    redacted by the log filter)."""
    log.debug(
        '%s:%d "GET %s HTTP/1.1" %s %d (%s)',
        client.host,
        client.port,
        target,
        result.status or "-",
        result.bytes_received,
        error or "whole",
    )


@dataclass
class NativeHttp:
    """How a container's GETs go through the core (native_http): the signer of its credential
    and the RangeClients of its endpoint (`owned`: the container's own, closed with it; else a
    Loader's, kept across its loads). A load's ranges go through BlobRangeReader, which keeps
    one client for all its threads; the listing's pages and small blobs through the methods
    here, one client lent per request."""

    signer: RequestSigner
    clients: RangeClients
    owned: bool

    def __post_init__(self) -> None:
        if self.signer.sends_token and not self.clients.endpoint.tls:
            raise InvalidArgument(
                f"refusing to send a bearer token over plain HTTP to "
                f"'{self.clients.endpoint.host}'",
                hint="use an https:// URL",
            )

    def get_document(self, target: str, headers: list[tuple[str, str]], max_bytes: int) -> bytes:
        """The 2xx body of one signed GET of a document (a listing page), at most `max_bytes`,
        read by the core without the GIL. Raises what native_requests.range_failure() makes of
        any other answer (RangeHttpError, the connection errors), for the caller's retry to
        classify."""
        return self._send(target, lambda client: client.get_document(target, headers, max_bytes))

    def get_range(
        self, target: str, headers: list[tuple[str, str]], size: int, first_byte: int = 0
    ) -> tuple[bytearray, int]:
        """(the `size` bytes of one signed ranged GET from `first_byte`, the blob's whole size
        as the answer gave it or -1): a small blob read whole (the index, the manifest) or in
        parts (an aux file). Raises as get_document() does, and RangeMismatch when the answer
        is not that range."""
        data = bytearray(size)

        def call(client: _core.RangeClient) -> tuple[_core.RangeResult, int]:
            result = client.get_into(target, headers, data, first_byte=first_byte)
            return result, result.total_size

        total = self._send(target, call)
        return data, total

    def _send(
        self, target: str, call: Callable[[_core.RangeClient], tuple[_core.RangeResult, T]]
    ) -> T:
        """call(a lent client) -> (its RangeResult, what it read); returns what it read, or
        raises what range_failure() makes of the result. The request is logged at DEBUG."""
        client = self.clients.lend()
        try:
            result, value = call(client)
        finally:
            self.clients.give_back(client)
        error = range_failure(result)
        log_request(client, target, result, error)
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        """Close the clients when they are this container's own."""
        if self.owned:
            self.clients.close()
