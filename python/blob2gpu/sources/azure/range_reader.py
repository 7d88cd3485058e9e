"""BlobRangeReader: one ranged GET of a listed blob into caller memory, retried until whole.

Every range is pinned to the etag seen at listing (If-Match): a blob overwritten since is a
BlobChanged, never a mix of two versions. A transient failure (reset, timeout, 408/429/5xx) retries
only the bytes still missing, after the RetryPolicy's backoff; a permanent one raises its typed
error at once.

The bytes go from the socket into the caller's memoryview. With native_http on (the default) the
core reads them: Python signs the GET (native_requests.RequestSigner) and the core's
RangeClient connects, sends it and reads the whole body without the GIL, reporting a RangeResult
that range_failure() turns into the exceptions failures.py and retry.py classify; the thread
takes the GIL back once per range, not once per socket read. With it off, azure-storage-blob
sends the GET and Python threads read the body (transport.py).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from blob2gpu import _core
from blob2gpu.errors import Blob2GpuError, BlobChanged, LoadCancelled
from blob2gpu.sources.azure.failures import (
    is_throttled,
    is_transient,
    storage_error,
    throttled_by_bandwidth,
)
from blob2gpu.sources.azure.native_clients import log_request
from blob2gpu.sources.azure.native_requests import RangeMismatch, range_failure
from blob2gpu.sources.azure.throttle import ThrottleControl
from blob2gpu.sources.azure.transport import RangeResponse, open_range
from blob2gpu.sources.plan import ShardRef

if TYPE_CHECKING:
    from blob2gpu.sources.azure.container import BlobContainer


class BlobRangeReader:
    """Reads byte ranges of the listed blobs of one container; one reader serves every thread of
    a load.

    Counters (read them once the reads are done): `requests`, every GET attempt, answered or not;
    retries_of(path), the retries of one blob's ranges (`retry.retries` counts every retry of
    the load, listing included).
    """

    def __init__(
        self,
        container: BlobContainer,
        stopping: threading.Event | None = None,
        throttle: ThrottleControl | None = None,
    ) -> None:
        """container: the load's (its client, location, retry policy and, with native_http on,
        the core's range clients and request signer); stopping: set to cancel the reads
        (defaults to the retry policy's); throttle: told of every answer and every throttled
        one (429, 503), to adapt the load's concurrency and range size."""
        self._container = container
        self._native = container.native
        self.location = container.location
        self.retry = container.retry
        self.throttle = throttle
        self._stopping = self.retry.stopping if stopping is None else stopping
        self._lock = threading.Lock()
        self._blobs: dict[str, Any] = {}  # blob path -> BlobClient
        self._open: set[RangeResponse] = set()  # SDK bodies being read, for interrupt()
        self._range_client: _core.RangeClient | None = None  # the core's, lent on the first read
        self._in_flight = 0  # get_into() calls on it
        self._retries: dict[str, int] = {}
        self.requests = 0

    def retries_of(self, path: str) -> int:
        """How many times a range of blob `path` was retried."""
        with self._lock:
            return self._retries.get(path, 0)

    def read_into(self, ref: ShardRef, offset: int, view: memoryview) -> None:
        """Fill `view` with bytes [offset, offset + len(view)) of the blob `ref` names, as of the
        etag it was listed with.

        Raises BlobChanged (the blob was overwritten or resized since it was listed),
        LoadCancelled (the stopping event was set), StorageUnavailable (transient failures
        outlasted the retry policy), or the typed error of a permanent failure (AccessDenied,
        BlobNotFound, BlobArchived, SourceUnavailable, ...).
        """
        total = len(view)
        what = f"shard '{ref.name}' bytes {offset}-{offset + total - 1}"
        pos = 0
        attempt = 0
        throttled = 0.0
        while pos < total:
            if self._stopping.is_set():
                raise LoadCancelled("the load was cancelled")
            self.retry.pause_while_throttled()
            # The node's throttling state is read once per request here (its decreases made),
            # again by acquire() only after a wait.
            wait = self.throttle.node_wait() if self.throttle is not None else 0.0
            if wait > 0:
                # Another load on this node was told to stay away (its Retry-After).
                if self._stopping.wait(min(wait, self.retry.throttled_seconds)):
                    raise LoadCancelled("the load was cancelled while waiting out throttling")
            with self._lock:
                self.requests += 1
            epoch = 0
            if self.throttle is not None:
                # Waits for a place in flight and, once the load is paced, for its pace.
                if not self.throttle.acquire(self._stopping, total - pos, follow=wait > 0):
                    raise LoadCancelled("the load was cancelled")
                epoch = self.throttle.epoch(follow=False)
            start = pos
            try:
                pos, error = self._attempt(ref, offset, view, pos)
            finally:
                if self.throttle is not None:
                    self.throttle.release()
            if error is None:
                if self.throttle is not None:
                    self.throttle.answered(pos - start)
                continue
            self._raise_unless_transient(error, ref, what)
            stay = None
            if self.throttle is not None and is_throttled(error):
                # One draw: this load stays away at least that long, its node's other loads as
                # long.
                stay = self.retry.stay_away(error)
                self.throttle.throttled(epoch, stay, by_rate=not throttled_by_bandwidth(error))
            attempt += 1
            with self._lock:
                self._retries[ref.path] = self._retries.get(ref.path, 0) + 1
            throttled = self.retry.wait_before_retry(
                attempt, error, what, ref.path, throttled, stay
            )

    def stop(self) -> None:
        """Cancel the reads: every wait (throttling, backoff, pace) ends and every read in flight
        breaks; each ends as LoadCancelled."""
        self._stopping.set()
        self.interrupt()

    def interrupt(self) -> None:
        """Break the reads in flight (their connections are closed): a thread blocked on a slow
        server wakes at once. Set the stopping event first, so they end as LoadCancelled (a read
        that starts after it sends nothing)."""
        with self._lock:
            responses = list(self._open)
            client = self._range_client if self._in_flight else None
            if client is not None:
                self._range_client = None  # closed for good: a later read borrows another
        for response in responses:
            try:
                response.close()
            except Exception:
                pass
        if client is not None and self._native is not None:
            client.close()
            self._native.clients.give_back(client, closed=True)

    def close(self) -> None:
        """The reads are over: the core's client (its keep-alive connections) goes back for
        the container's next reader (a Loader's next load)."""
        with self._lock:
            client, self._range_client = self._range_client, None
        if client is not None and self._native is not None:
            self._native.clients.give_back(client)

    def _blob(self, path: str) -> Any:
        with self._lock:
            if path not in self._blobs:
                self._blobs[path] = self._container.client.get_blob_client(path)
            return self._blobs[path]

    def _attempt(
        self, ref: ShardRef, offset: int, view: memoryview, pos: int
    ) -> tuple[int, Exception | None]:
        """One GET of the bytes view[pos:] still lacks: (how far `view` is now filled, the failure
        that cut this attempt short or None). Raises BlobChanged when the answer does not fit
        the listed blob, and the typed error of a client that cannot be made (SourceUnavailable:
        no OpenSSL for HTTPS)."""
        if self._native is None:
            return self._attempt_sdk(ref, offset, view, pos)
        start, end = offset + pos, offset + len(view)
        try:
            target, headers = self._native.signer.range_get(ref.path, start, end, ref.etag)
        except Blob2GpuError:
            raise
        except Exception as e:  # the token credential could not get a token
            return pos, e
        with self._lock:
            if self._stopping.is_set():  # interrupt() may have come and gone: send nothing
                return pos, ConnectionAbortedError("the load is stopping")
            if self._range_client is None:
                self._range_client = self._native.clients.lend()
            client = self._range_client
            self._in_flight += 1
        try:
            # The GIL is released for the whole exchange: connecting, TLS, the body.
            result = client.get_into(target, headers, view[pos:], first_byte=start)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        with self._lock:
            self._in_flight -= 1
        error = range_failure(result)
        log_request(client, target, result, error)
        if isinstance(error, RangeMismatch):
            raise self._changed(ref, error.total_size)
        if error is None and result.total_size not in (-1, ref.size):
            raise self._changed(ref, result.total_size)
        return pos + result.bytes_received, error

    def _attempt_sdk(
        self, ref: ShardRef, offset: int, view: memoryview, pos: int
    ) -> tuple[int, Exception | None]:
        """_attempt() through azure-storage-blob: the body read by this thread, one socket read
        at a time (transport.py)."""
        blob = self._blob(ref.path)
        total = len(view)
        opened: RangeResponse | None = None
        response: RangeResponse | None = None
        try:
            opened = response = open_range(blob, offset + pos, offset + total, ref.etag)
            with self._lock:
                self._open.add(opened)
            self._check_range(ref, response, offset + pos, offset + total)
            while pos < total:
                n = response.readinto(view[pos:])
                if not n:
                    raise ConnectionResetError(f"connection closed after {pos} of {total} bytes")
                pos += n
            response.release()  # keep-alive: back to the pool
            response = None
            return pos, None
        except Blob2GpuError:
            raise
        except Exception as e:
            return pos, e
        finally:
            if response is not None:
                response.close()  # a broken body: drop the connection
            with self._lock:
                self._open.discard(opened)

    def _raise_unless_transient(self, error: Exception, ref: ShardRef, what: str) -> None:
        """Raise the typed error `error` comes to unless a retry may cure it."""
        if self._stopping.is_set():
            raise LoadCancelled("the load was cancelled") from None
        status = getattr(error, "status_code", None)
        if status in (412, 416):
            raise BlobChanged(
                f"shard '{ref.name}': {self.location.describe(ref.path)} changed "
                f"during the load (HTTP {status}: its etag is no longer {ref.etag}); "
                "nothing from it was kept",
                blob=ref.path,
                etag=ref.etag,
                hint="load again",
            ) from None
        if not is_transient(error):
            raise storage_error(error, self.location, ref.path, what) from None

    def _changed(self, ref: ShardRef, size: int | str) -> BlobChanged:
        """The blob `ref` names is not the listed one any more: the server reports `size` bytes
        (-1 or '': it did not say)."""
        said = "?" if size in (-1, "") else size
        return BlobChanged(
            f"shard '{ref.name}': {self.location.describe(ref.path)} changed during "
            f"the load (expected {ref.size} bytes, the server reports {said})",
            blob=ref.path,
            etag=ref.etag,
            hint="load again",
        )

    def _check_range(self, ref: ShardRef, response: RangeResponse, start: int, end: int) -> None:
        """Raise BlobChanged unless the answer holds exactly bytes [start, end) of a blob of the
        listed size."""
        length = int(response.header("Content-Length") or -1)
        total = (response.header("Content-Range") or "").rsplit("/", 1)[-1]
        if length != end - start or (total.isdigit() and int(total) != ref.size):
            raise self._changed(ref, total)
