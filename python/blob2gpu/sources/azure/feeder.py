"""BlobFeeder: concurrent ranged GETs from Azure Blob Storage, written by the socket straight into
the pipeline's landings (a pinned staging slot, or the cpu arena itself).

Each shard's first range starts at offset 0 and carries the header and the first data, so there is
no separate header round trip; the shard's other ranges are scheduled once the core has parsed that
header. First ranges go ahead of data ranges: every shard's header is read (and its arena made) at
the start, so the load does not end with one late shard's header round trip while the other
connections sit idle. Every range is pinned to the etag seen at listing
(If-Match). A transient failure (reset, timeout, 408/429/5xx) retries only the bytes still missing,
after an exponential backoff with jitter; a permanent one fails the load at once.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from blob2gpu.errors import (
    Blob2GpuError,
    BlobChanged,
    HeaderTruncated,
    LoadCancelled,
    StorageUnavailable,
)
from blob2gpu.redaction import redact
from blob2gpu.sources.azure.service import (
    BlobLocation,
    failure_reason,
    is_transient,
    proxy_problem,
    response_header,
    storage_error,
)
from blob2gpu.sources.plan import ShardPlan, ShardRef

T = TypeVar("T")


class RetryPolicy:
    """Exponential backoff with jitter for transient storage failures; counts what it retried."""

    def __init__(
        self,
        location: BlobLocation,
        max_attempts: int,
        backoff_seconds: float,
        backoff_max_seconds: float,
        stopping: threading.Event | None = None,
        throttled_seconds: float = 120.0,
    ) -> None:
        self.location = location
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.throttled_seconds = throttled_seconds
        self.stopping = stopping or threading.Event()
        self._lock = threading.Lock()
        self.retries = 0
        self.waited_seconds = 0.0  # backoff slept before retries, summed over threads
        # When the account throttles (429, 503 ServerBusy), every thread of this load backs off
        # together: a thread whose last request succeeded would otherwise keep the pressure on.
        self._cooldown_until = 0.0

    def pause_while_throttled(self) -> None:
        """Wait out a throttling backoff another thread of this load started; raises
        LoadCancelled if the load stops meanwhile."""
        while True:
            with self._lock:
                remaining = self._cooldown_until - time.monotonic()
            if remaining <= 0:
                return
            if self.stopping.wait(remaining):
                raise LoadCancelled("the load was cancelled while waiting out throttling")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based): jittered, capped."""
        ceiling = min(self.backoff_max_seconds, self.backoff_seconds * (2 ** (attempt - 1)))
        return ceiling * random.uniform(0.5, 1.0)

    def backoff(self, attempt: int, error: BaseException) -> float:
        """The wait before retry number `attempt`: the jittered backoff, or longer when the
        server said how long to stay away (Retry-After), up to retry_throttled_seconds."""
        return max(self.delay(min(attempt, 16)), min(retry_after(error), self.throttled_seconds))

    def wait_before_retry(
        self, attempt: int, error: BaseException, what: str, blob: str | None,
        throttled_waited: float = 0.0,
    ) -> float:
        """Count a retry and sleep; returns the seconds this request has now waited on throttling.

        Raises StorageUnavailable once the attempts are spent, except that a throttled request
        (429, 503) keeps waiting while its throttling waits stay under retry_throttled_seconds:
        an account that sheds load is not an account that is down.
        """
        throttled = getattr(error, "status_code", None) in (429, 503)
        if attempt >= self.max_attempts and not (
                throttled and throttled_waited < self.throttled_seconds):
            raise StorageUnavailable(
                f"{what}: {self.location.describe(blob)} kept failing after {attempt} attempts "
                f"(last: {failure_reason(error, self.location)}); raise "
                "retry_max_attempts (or retry_throttled_seconds when throttled) or check "
                + (
                    "the proxy, or leave this host out with NO_PROXY"
                    if proxy_problem(error)
                    else "the storage account's health and throttling"
                )
            ) from None
        delay = self.backoff(attempt, error)
        with self._lock:
            self.retries += 1
            self.waited_seconds += delay
            if throttled:
                self._cooldown_until = max(self._cooldown_until, time.monotonic() + delay)
        if self.stopping.wait(delay):
            raise LoadCancelled("the load was cancelled while waiting to retry")
        return throttled_waited + (delay if throttled else 0.0)

    def run(self, fn: Callable[[], T], what: str, blob: str | None) -> T:
        """Call fn, retrying transient failures; permanent ones raise a typed error."""
        attempt = 0
        throttled = 0.0
        while True:
            try:
                self.pause_while_throttled()
                return fn()
            except Blob2GpuError:
                raise
            except Exception as e:
                if not is_transient(e):
                    raise storage_error(e, self.location, blob, what) from None
                attempt += 1
                throttled = self.wait_before_retry(attempt, e, what, blob, throttled)


def retry_after(error: BaseException) -> float:
    """Seconds the server asked a client to wait (retry-after-ms, x-ms-retry-after-ms or
    Retry-After in seconds or as an HTTP date) on a failed response; 0 when it did not say."""
    try:
        for name in ("retry-after-ms", "x-ms-retry-after-ms"):
            if milliseconds := response_header(error, name):
                return max(0.0, float(milliseconds) / 1000)
        value = response_header(error, "retry-after")
        if not value:
            return 0.0
        if value.strip().isdigit():
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return 0.0  # a header we cannot read is one we did not get


@dataclass
class RangeTask:
    shard: int
    start: int
    end: int
    first: bool = False  # carries the header: schedules the shard's remaining ranges


class BlobFeeder:
    """Feeds one fed LoadSession from Blob Storage with `concurrency` threads."""

    def __init__(
        self,
        session: Any,
        plan: ShardPlan,
        container_client: Any,
        retry: RetryPolicy,
        concurrency: int,
        chunk_bytes: int,
        fetch: list[int] | None = None,
        cache_writer: Any = None,
        first_range_bytes: int | None = None,
    ) -> None:
        self._session = session
        self._fetch = list(range(len(plan.shards))) if fetch is None else fetch  # not cache hits
        self._cache_writer = cache_writer  # write-through to the NVMe cache, or None
        # The first range carries the header; when data lands in host memory it goes through a
        # staging slot (the arena does not exist yet), so keep it small there.
        self._first = first_range_bytes or chunk_bytes
        self._plan = plan
        self._container = container_client
        self._retry = retry
        self._chunk = chunk_bytes
        self._blobs = [container_client.get_blob_client(s.path) for s in plan.shards]
        self._headers: deque[RangeTask] = deque()  # first ranges (and rests of long headers)
        self._queue: deque[RangeTask] = deque()  # data ranges
        self._cv = threading.Condition()
        self._active = 0
        self._stopping = retry.stopping
        self._threads = [
            threading.Thread(target=self._worker, name=f"blob2gpu-feeder-{i}", daemon=True)
            for i in range(concurrency)
        ]
        self._open_responses: set[Any] = set()
        self.error: BaseException | None = None
        self.shard_retries = [0] * len(plan.shards)
        self.requests = 0
        self.bytes_fetched = 0

    # -- scheduling -------------------------------------------------------------------------------
    def start(self) -> BlobFeeder:
        for i in self._fetch:
            ref = self._plan.shards[i]
            if ref.size < 8:
                self._fail(
                    HeaderTruncated(
                        f"shard '{ref.name}': blob is {ref.size} bytes, shorter "
                        "than the 8-byte safetensors header length"
                    )
                )
                return self
            self._headers.append(RangeTask(i, 0, min(self._first, ref.size), first=True))
        for t in self._threads:
            t.start()
        return self

    def _next(self) -> RangeTask | None:
        with self._cv:
            while True:
                if self._stopping.is_set():
                    return None
                if self._headers or self._queue:
                    self._active += 1
                    return (self._headers or self._queue).popleft()
                if self._active == 0:
                    return None  # every range fetched
                self._cv.wait()

    def _done(self, follow_ups: list[RangeTask]) -> None:
        with self._cv:
            # The rest of a long header goes first; data ranges queue behind the shards whose
            # headers were read before, so shards complete one after another, in order.
            self._headers.extendleft(reversed([t for t in follow_ups if t.first]))
            self._queue.extend(t for t in follow_ups if not t.first)
            self._active -= 1
            self._cv.notify_all()

    def _ranges(self, shard: int, start: int, end: int) -> list[RangeTask]:
        return [
            RangeTask(shard, a, min(end, a + self._chunk)) for a in range(start, end, self._chunk)
        ]

    def _worker(self) -> None:
        while (task := self._next()) is not None:
            follow_ups: list[RangeTask] = []
            try:
                follow_ups = self._run(task)
            except BaseException as e:
                self._fail(e)
            finally:
                self._done(follow_ups)

    def _run(self, task: RangeTask) -> list[RangeTask]:
        ref = self._plan.shards[task.shard]
        landing = self._session.acquire(task.shard, task.start, task.end - task.start)
        if landing is None:
            return []  # cancelled
        try:
            self._fetch_into(task.shard, ref, task.start, landing.view)
            if self._cache_writer is not None:
                self._cache_writer.offer(task.shard, task.start, landing.view)
        except BaseException:
            self._session.release(landing)
            raise
        status = self._session.commit(landing)
        if not status.header_ready:
            # The header is longer than the first range: fetch the rest of it, then the data.
            return [RangeTask(task.shard, status.header_have, status.data_offset, first=True)]
        if task.first:
            # The data this load needs (all of it, or a tensor selection's), past the first range.
            start = max(task.end, status.data_offset)
            follow_ups = []
            for begin, end in self._session.needed_ranges(task.shard):
                if max(begin, start) < end:
                    follow_ups += self._ranges(task.shard, max(begin, start), end)
            return follow_ups
        return []

    # -- fetching ---------------------------------------------------------------------------------
    def _fetch_into(self, shard: int, ref: ShardRef, offset: int, view: memoryview) -> None:
        """Fill `view` with bytes [offset, offset + len(view)) of the blob, retrying what failed."""
        from azure.storage.blob._generated.models import ModifiedAccessConditions

        blob = self._blobs[shard]
        total = len(view)
        pos = 0
        attempt = 0
        throttled = 0.0
        what = f"shard '{ref.name}' bytes {offset}-{offset + total - 1}"
        while pos < total:
            if self._stopping.is_set():
                raise LoadCancelled("the load was cancelled")
            response = None
            self._retry.pause_while_throttled()
            with self._cv:
                self.requests += 1  # every attempt, answered or not
            try:
                # The generated operation is the SDK's own GET (auth, headers, logging policies);
                # with stream=True its body is still in the socket, which readinto() below empties
                # into the landing with no intermediate bytes objects.
                pipeline_response = blob._client.blob.download(
                    range=f"bytes={offset + pos}-{offset + total - 1}",
                    modified_access_conditions=ModifiedAccessConditions(if_match=ref.etag),
                    cls=lambda pipeline_response, _body, _headers: pipeline_response,
                )
                response = pipeline_response.http_response.internal_response
                self._check_range(ref, response, offset + pos, offset + total)
                with self._cv:
                    self._open_responses.add(response)
                body = response.raw._fp  # http.client.HTTPResponse: readinto() fills our memory
                while pos < total:
                    n = body.readinto(view[pos:])
                    if not n:
                        raise ConnectionResetError(
                            f"connection closed after {pos} of {total} bytes"
                        )
                    pos += n
                    with self._cv:
                        self.bytes_fetched += n
                response.raw.release_conn()  # keep-alive: back to the pool
                response = None
            except Blob2GpuError:
                raise
            except Exception as e:
                if self._stopping.is_set():
                    raise LoadCancelled("the load was cancelled") from None
                status = getattr(e, "status_code", None)
                if status in (412, 416):
                    raise BlobChanged(
                        f"shard '{ref.name}': {self._plan.location.describe(ref.path)} changed "
                        f"during the load (HTTP {status}: its etag is no longer {ref.etag}); "
                        "nothing from it was kept: load again"
                    ) from None
                if not is_transient(e):
                    raise storage_error(e, self._plan.location, ref.path, what) from None
                attempt += 1
                with self._cv:
                    self.shard_retries[shard] += 1
                throttled = self._retry.wait_before_retry(attempt, e, what, ref.path, throttled)
            finally:
                if response is not None:
                    response.close()  # a broken body: drop the connection
                    with self._cv:
                        self._open_responses.discard(response)
                else:
                    with self._cv:
                        self._open_responses = {
                            r for r in self._open_responses if not getattr(r.raw, "closed", False)
                        }

    def _check_range(self, ref: ShardRef, response: Any, start: int, end: int) -> None:
        length = int(response.headers.get("Content-Length", -1))
        total = response.headers.get("Content-Range", "").rsplit("/", 1)[-1]
        if length != end - start or (total.isdigit() and int(total) != ref.size):
            response.close()
            raise BlobChanged(
                f"shard '{ref.name}': {self._plan.location.describe(ref.path)} changed during "
                f"the load (expected {ref.size} bytes, the server reports "
                f"{total or '?'}); load again"
            )

    # -- ending -----------------------------------------------------------------------------------
    def _fail(self, error: BaseException) -> None:
        with self._cv:
            first = self.error is None
            # A thread stopped because another failed must not hide the failure that stopped it.
            if first or (isinstance(self.error, LoadCancelled)
                         and not isinstance(error, LoadCancelled)):
                self.error = error
            self._cv.notify_all()
        if first:
            self._stopping.set()
            message = redact(error)
            kind = "LoadCancelled" if isinstance(error, LoadCancelled) else "SourceReadError"
            try:
                self._session.abort(kind, message)
            except Exception:
                pass

    def stop(self) -> None:
        """Stop fetching: cancel waits, break open responses, and join the threads."""
        if any(t.is_alive() for t in self._threads):
            self._session.cancel()  # wakes threads waiting for a staging slot
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
            responses = list(self._open_responses)
        for r in responses:
            try:
                r.close()
            except Exception:
                pass
        for t in self._threads:
            if t.is_alive():
                t.join()

    @property
    def retries(self) -> int:
        return self._retry.retries

    @property
    def retry_wait_seconds(self) -> float:
        return self._retry.waited_seconds
