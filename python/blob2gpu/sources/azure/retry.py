"""RetryPolicy: how blob2gpu retries a storage request that failed transiently (reset, timeout,
408/429/5xx): exponential backoff with jitter, the server's Retry-After honoured up to a budget
(a throttled answer without one waits out most of the account's one-second window), every thread
of a load backing off together while the account throttles, and a count of what was retried.
Every request to storage goes through one: the ranged GETs (range_reader.py), the listing, and
the reads of the index, manifest and other files (listing.py, container.py). The SDK's own
retries are off (container.py), so each retry is ours to count and to bound."""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from blob2gpu.errors import Blob2GpuError, LoadCancelled, StorageUnavailable
from blob2gpu.redaction import detached
from blob2gpu.sources.azure.failures import (
    failure_reason,
    is_throttled,
    is_transient,
    response_header,
    retry_advice,
    storage_error,
)
from blob2gpu.sources.azure.location import BlobLocation
from blob2gpu.sources.azure.throttle import ACCOUNT_WINDOW_SECONDS

T = TypeVar("T")


class RetryPolicy:
    """Exponential backoff with jitter for transient storage failures; counts what it retried."""

    def __init__(
        self,
        location: BlobLocation,
        max_attempts: int,
        backoff_seconds: float,
        backoff_max_seconds: float,
        throttled_seconds: float = 120.0,
    ) -> None:
        self.location = location
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.throttled_seconds = throttled_seconds
        self.stopping = threading.Event()  # set: the waits end at once (the load is stopping)
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

    def backoff(self, attempt: int, error: BaseException, stay: float | None = None) -> float:
        """The wait before retry number `attempt` (1-based): the jittered, capped backoff, or
        longer when the server said, or throttling implies, a longer one (`stay`, drawn by
        stay_away if not given)."""
        doubled = self.backoff_seconds * (2 ** (min(attempt, 16) - 1))
        delay = float(min(self.backoff_max_seconds, doubled) * random.uniform(0.5, 1.0))
        return max(delay, self.stay_away(error) if stay is None else stay)

    def stay_away(self, error: BaseException) -> float:
        """How long `error` keeps a request away, at least (a draw: the caller that tells others
        to stay away as long draws once): what the server asked (Retry-After, spread over up to
        a quarter more, so the loaders it told at once do not all come back at once); for a
        throttled answer (429, 503) that names no wait, the second half of the account's
        window, spread over it; either up to retry_throttled_seconds. An account enforces its
        limits per second, and a request sent again within the second it was refused in is
        refused again (a fleet coming back after a first backoff of a fraction of a second was
        refused once more). 0 for any other failure."""
        asked = retry_after(error)
        if asked:
            return min(asked * random.uniform(1.0, 1.25), self.throttled_seconds)
        if is_throttled(error):
            return min(ACCOUNT_WINDOW_SECONDS * random.uniform(0.5, 1.0), self.throttled_seconds)
        return 0.0

    def wait_before_retry(
        self,
        attempt: int,
        error: BaseException,
        what: str,
        blob: str | None,
        throttled_waited: float = 0.0,
        stay: float | None = None,
    ) -> float:
        """Count a retry and sleep (backoff(); `stay`: the stay_away() the caller drew and told
        others); returns the seconds this request has now waited on throttling.

        Raises StorageUnavailable once the attempts are spent, except that a throttled request
        (429, 503) keeps waiting while its throttling waits stay under retry_throttled_seconds:
        an account that sheds load is not an account that is down.
        """
        throttled = is_throttled(error)
        if attempt >= self.max_attempts and not (
            throttled and throttled_waited < self.throttled_seconds
        ):
            hint = retry_advice(error, self.location)
            raise StorageUnavailable(
                f"{what}: {self.location.describe(blob)} kept failing after {attempt} attempts "
                f"(last: {failure_reason(error, self.location)})",
                blob=blob,
                hint=hint,
            ) from None
        delay = self.backoff(attempt, error, stay)
        with self._lock:
            self.retries += 1
            self.waited_seconds += delay
            if throttled:
                self._cooldown_until = max(self._cooldown_until, time.monotonic() + delay)
        if self.stopping.wait(delay):
            raise LoadCancelled("the load was cancelled while waiting to retry")
        return throttled_waited + (delay if throttled else 0.0)

    def run(self, fn: Callable[[], T], what: str, blob: str | None) -> T:
        """Call fn, retrying transient failures; permanent ones raise a typed error, which
        carries no exception chained to it (detached: the SDK's holds the request's URL)."""
        attempt = 0
        throttled = 0.0
        while True:
            self.pause_while_throttled()
            try:
                return fn()
            except Exception as e:
                error = e
            # Out of the except block: what is raised from here chains nothing.
            if isinstance(error, Blob2GpuError):
                raise detached(error)
            if not is_transient(error):
                raise storage_error(error, self.location, blob, what)
            attempt += 1
            throttled = self.wait_before_retry(attempt, error, what, blob, throttled)


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
