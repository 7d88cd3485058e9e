"""BlobRangeReader: one ranged GET of a listed blob into caller memory, retried until whole.

Every range is pinned to the etag seen at listing (If-Match): a blob overwritten since is a
BlobChanged, never a mix of two versions. A transient failure (reset, timeout, 408/429/5xx) retries
only the bytes still missing, after the RetryPolicy's backoff; a permanent one raises its typed
error at once. The bytes go from the socket into the caller's memoryview (transport.py).
"""

from __future__ import annotations

import threading
from typing import Any

from blob2gpu.errors import Blob2GpuError, BlobChanged, LoadCancelled
from blob2gpu.sources.azure.failures import (
    is_throttled,
    is_transient,
    storage_error,
    throttled_by_bandwidth,
)
from blob2gpu.sources.azure.location import BlobLocation
from blob2gpu.sources.azure.retry import RetryPolicy
from blob2gpu.sources.azure.throttle import ThrottleControl
from blob2gpu.sources.azure.transport import RangeResponse, open_range
from blob2gpu.sources.plan import ShardRef


class BlobRangeReader:
    """Reads byte ranges of the listed blobs of one container; one reader serves every thread of
    a load.

    Counters (read them once the reads are done): `requests`, every GET attempt, answered or not;
    `bytes_read`, body bytes that landed; retries_of(path), the retries of one blob's ranges
    (`retry.retries` counts every retry of the load, listing included).
    """

    def __init__(
        self,
        container_client: Any,
        location: BlobLocation,
        retry: RetryPolicy,
        stopping: threading.Event | None = None,
        throttle: ThrottleControl | None = None,
    ) -> None:
        """container_client: an azure.storage.blob.ContainerClient; stopping: set to cancel the
        reads (defaults to the retry policy's); throttle: told of every answer and every
        throttled one (429, 503), to adapt the load's concurrency and range size."""
        self._container = container_client
        self.location = location
        self.retry = retry
        self.throttle = throttle
        self._stopping = retry.stopping if stopping is None else stopping
        self._lock = threading.Lock()
        self._blobs: dict[str, Any] = {}  # blob path -> BlobClient
        self._open: set[RangeResponse] = set()  # bodies being read, for interrupt()
        self._retries: dict[str, int] = {}
        self.requests = 0
        self.bytes_read = 0

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
        blob = self._blob(ref.path)
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
                pos, error = self._attempt(blob, ref, offset, view, pos)
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
        server wakes at once. Set the stopping event first, so they end as LoadCancelled."""
        with self._lock:
            responses = list(self._open)
        for response in responses:
            try:
                response.close()
            except Exception:
                pass

    def _blob(self, path: str) -> Any:
        with self._lock:
            if path not in self._blobs:
                self._blobs[path] = self._container.get_blob_client(path)
            return self._blobs[path]

    def _attempt(
        self, blob: Any, ref: ShardRef, offset: int, view: memoryview, pos: int
    ) -> tuple[int, Exception | None]:
        """One GET of the bytes view[pos:] still lacks: (how far `view` is now filled, the failure
        that cut this attempt short or None). Raises BlobChanged when the answer does not fit
        the listed blob."""
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
                with self._lock:
                    self.bytes_read += n
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
                "nothing from it was kept: load again"
            ) from None
        if not is_transient(error):
            raise storage_error(error, self.location, ref.path, what) from None

    def _check_range(self, ref: ShardRef, response: RangeResponse, start: int, end: int) -> None:
        """Raise BlobChanged unless the answer holds exactly bytes [start, end) of a blob of the
        listed size."""
        length = int(response.header("Content-Length") or -1)
        total = (response.header("Content-Range") or "").rsplit("/", 1)[-1]
        if length != end - start or (total.isdigit() and int(total) != ref.size):
            raise BlobChanged(
                f"shard '{ref.name}': {self.location.describe(ref.path)} changed during "
                f"the load (expected {ref.size} bytes, the server reports "
                f"{total or '?'}); load again"
            )
