"""A fan-out rank's ranged GETs (GroupExchange._fetch, through its source's AzureRanges): when
one of its fetch threads fails, the others stop at once, also one sitting in a throttled wait (a
Retry-After up to retry_throttled_seconds), and the first failure is the one raised. The GETs go
to a scripted server of this process, through the core's range reader (native_http, the
default) and through azure-storage-blob."""

from __future__ import annotations

import dataclasses
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from blob2gpu.errors import BlobChanged
from blob2gpu.integrations.distributed import GroupExchange
from blob2gpu.settings import resolve
from blob2gpu.sources.azure.container import open_container
from blob2gpu.sources.azure.range_reader import BlobRangeReader
from blob2gpu.sources.azure.retry import RetryPolicy
from blob2gpu.sources.azure.source import AzureRanges
from blob2gpu.sources.azure.throttle import ThrottleControl
from blob2gpu.sources.plan import ShardRef

KiB = 1 << 10
KEY = {"account_name": "acct", "account_key": "a2V5"}


class _Policy(RetryPolicy):
    """The load's retry policy, saying when a retry's wait begins."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = threading.Event()

    def wait_before_retry(self, *args, **kwargs) -> float:
        self.waiting.set()
        return super().wait_before_retry(*args, **kwargs)


class _Storage(ThreadingHTTPServer):
    """Answers the first range 503 ServerBusy with a Retry-After of an hour once the second
    range was asked for, and the second 412 (the blob changed) once the first one's thread
    waits out its throttling."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Answer)
        self.retry: _Policy | None = None
        self.second_sent = threading.Event()
        self.asked: list[int] = []


class _Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Storage

    def do_GET(self) -> None:
        start = int(self.headers["x-ms-range"].removeprefix("bytes=").split("-")[0])
        self.server.asked.append(start)
        if start == 0:
            self.server.second_sent.wait(30)
            self._answer(503, "Operations per second is over the account limit.", "ServerBusy")
        else:
            self.server.second_sent.set()
            assert self.server.retry is not None
            self.server.retry.waiting.wait(30)  # the other thread is in its wait: fail now
            self._answer(412, "The condition specified is not met.", "ConditionNotMet")

    def _answer(self, status: int, reason: str, code: str) -> None:
        self.send_response(status, reason)
        self.send_header("x-ms-error-code", code)
        self.send_header("Retry-After", "3600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("native_http", [True, False])
def test_a_failed_fetch_thread_stops_one_waiting_out_throttling(native_http):
    server = _Storage()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/acct/c/m"
    container = open_container(url, resolve({"native_http": native_http}), KEY)
    # A Retry-After of an hour, honoured up to retry_throttled_seconds (10 minutes): the wait
    # the other thread's failure must cut short.
    retry = server.retry = _Policy(container.location, 6, 0.01, 0.05, throttled_seconds=600.0)
    container = dataclasses.replace(container, retry=retry)
    throttle = ThrottleControl(ceiling=2, range_bytes=64 * KiB, max_range_bytes=64 * KiB)
    exchange = GroupExchange.__new__(GroupExchange)
    exchange._ranges = AzureRanges(BlobRangeReader(container, None, throttle), retry, throttle)
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
    server.shutdown()
    container.close()
    assert not thread.is_alive(), "a fetch thread kept waiting out throttling after a failure"
    assert len(raised) == 1 and isinstance(raised[0], BlobChanged)  # not a LoadCancelled
    assert sorted(server.asked) == [0, 64 * KiB]  # neither range was sent again
    assert retry.stopping.is_set()
