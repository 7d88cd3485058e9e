"""A fan-out rank's ranged GETs (GroupExchange._fetch, through its source's AzureRanges): when
one of its fetch threads fails, the others stop at once, also one sitting in a throttled wait (a
Retry-After up to retry_throttled_seconds), and the first failure is the one raised."""

from __future__ import annotations

import threading

from blob2gpu.errors import BlobChanged
from blob2gpu.integrations.distributed import GroupExchange
from blob2gpu.sources.azure import range_reader
from blob2gpu.sources.azure.location import BlobLocation
from blob2gpu.sources.azure.range_reader import BlobRangeReader
from blob2gpu.sources.azure.retry import RetryPolicy
from blob2gpu.sources.azure.source import AzureRanges
from blob2gpu.sources.azure.throttle import ThrottleControl
from blob2gpu.sources.plan import ShardRef

KiB = 1 << 10


class _Busy(Exception):
    """What the SDK raises for 503 ServerBusy with a Retry-After (status and headers only)."""

    status_code = 503

    def __init__(self, seconds: int) -> None:
        super().__init__("Egress is over the account limit.\nErrorCode:ServerBusy")
        self.reason = "Egress is over the account limit."
        self.response = type("Response", (), {"headers": {"retry-after": str(seconds)}})


class _Container:
    def get_blob_client(self, path: str) -> object:
        return object()


class _Policy(RetryPolicy):
    """The load's retry policy, saying when a retry's wait begins."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = threading.Event()

    def wait_before_retry(self, *args, **kwargs) -> float:
        self.waiting.set()
        return super().wait_before_retry(*args, **kwargs)


def test_a_failed_fetch_thread_stops_one_waiting_out_throttling(monkeypatch):
    location = BlobLocation("https://acct.blob.core.windows.net", "acct", "c", "m")
    # A Retry-After of an hour, honoured up to retry_throttled_seconds (10 minutes): the wait
    # the other thread's failure must cut short.
    retry = _Policy(location, 6, 0.01, 0.05, throttled_seconds=600.0)
    throttle = ThrottleControl(ceiling=2, range_bytes=64 * KiB, max_range_bytes=64 * KiB)
    exchange = GroupExchange.__new__(GroupExchange)
    reader = BlobRangeReader(_Container(), location, retry, None, throttle)
    exchange._ranges = AzureRanges(reader, retry, throttle)
    second_sent = threading.Event()
    asked: list[int] = []

    def open_range(blob, start, end, etag):
        asked.append(start)
        if start == 0:
            # The first range is throttled once the second is sent (so that one is not held by
            # the load's throttling wait before it is): its thread waits out the Retry-After.
            second_sent.wait(30)
            raise _Busy(3600)
        second_sent.set()
        retry.waiting.wait(30)  # the other thread is in its wait: now this one fails
        raise BlobChanged("shard 'a': the blob changed during the load")

    monkeypatch.setattr(range_reader, "open_range", open_range)
    ref = ShardRef("a", "a.safetensors", 128 * KiB, etag='"0x1"')
    view = memoryview(bytearray(128 * KiB))
    raised: list[BaseException] = []

    def fetch() -> None:
        try:
            exchange._fetch(ref, view, 0, [(0, 128 * KiB)])
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(timeout=120)  # not a timing: without the stop it would wait 600 s
    assert not thread.is_alive(), "a fetch thread kept waiting out throttling after a failure"
    assert len(raised) == 1 and isinstance(raised[0], BlobChanged)  # not a LoadCancelled
    assert sorted(asked) == [0, 64 * KiB]  # neither range was sent again
    assert retry.stopping.is_set()
