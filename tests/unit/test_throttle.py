"""ThrottleControl on scripted sequences of throttled answers (429, 503) and successes: a load
starts at its ceiling unless its node was throttled lately, when it starts at one request and
doubles its concurrency per round of unthrottled answers up to where the node came to, then adds
one per round (a limited slow start); one burst of 503s is one decrease (back to one request in
flight, a slow start up to half the limit it had, then one more per round; ranges grown on
request-rate throttling only), the loads of one node share what they learned, and the user's
settings bound both knobs."""

from __future__ import annotations

import math
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from blob2gpu.sources.azure import throttle
from blob2gpu.sources.azure.failures import throttled_by_bandwidth
from blob2gpu.sources.azure.throttle import RANGE_GROWTH, NodeThrottle, ThrottleControl
from support.node_state import wait_left

KiB = 1 << 10


def at_ceiling(control: ThrottleControl) -> ThrottleControl:
    """The control after unthrottled answers took it to its ceiling."""
    for _ in range(100 * control.ceiling):
        if control.concurrency == control.ceiling:
            break
        control.answered()
    assert control.concurrency == control.ceiling
    return control


def throttled_node(directory, concurrency: int, range_bytes: int = 1) -> NodeThrottle:
    """A node whose loads were throttled just now, down to `concurrency`."""
    node = NodeThrottle(directory)
    assert node.publish(0.0, concurrency, range_bytes) == 1
    return node


def test_a_load_on_a_node_never_throttled_starts_at_its_ceiling(tmp_path):
    # No reason to start slowly: the node has seen no throttling (or the load has no node).
    for node in (NodeThrottle(tmp_path), None):
        control = ThrottleControl(
            ceiling=16, range_bytes=64 * KiB, max_range_bytes=64 * KiB, node=node
        )
        assert control.concurrency == 16 and not control.answered()
        assert control.stats().min_concurrency == 16


def test_a_load_on_a_node_throttled_lately_doubles_to_where_it_came_then_one_per_round(tmp_path):
    node = throttled_node(tmp_path, 8)
    control = ThrottleControl(ceiling=16, range_bytes=64 * KiB, max_range_bytes=64 * KiB, node=node)
    assert control.concurrency == 1
    trace = [control.concurrency]
    for _ in range(200):
        control.answered()
        trace.append(control.concurrency)
    # One more per answer up to the node's 8: a round of 1 answer makes 2, the next 2 make 4, the
    # next 4 make 8; then one more per round of answers as long as the limit: 8 more make 9, ...
    assert (trace[1], trace[3], trace[7], trace[15], trace[24]) == (2, 4, 8, 9, 10)
    assert trace.index(16) == 7 + sum(range(8, 16))
    assert max(trace) == 16  # prefetch_concurrency is a ceiling, never passed
    assert control.stats().decreases == 0 and control.stats().min_concurrency == 1


@pytest.mark.parametrize(
    ("ceiling", "at_ceiling_after"),
    [
        (3, 1 + 2),
        (4, 1 + 2 + 3),
        (5, 1 + 2 + 3 + 4),
        (6, 2 + 3 + 4 + 5),
        (9, 3 + 4 + 5 + 6 + 7 + 8),
    ],
)
def test_small_and_odd_ceilings_double_to_half_then_add_one_per_round(
    tmp_path, ceiling, at_ceiling_after
):
    # The node came to half the ceiling (what a load at its ceiling publishes when throttled).
    half = max(1, ceiling // 2)
    control = ThrottleControl(ceiling, 1, 1, throttled_node(tmp_path, half))
    trace = [control.concurrency]
    for _ in range(100):
        control.answered()
        trace.append(control.concurrency)
    assert trace[half - 1] == half  # +1 per answer from one request
    assert trace.index(ceiling) == at_ceiling_after and max(trace) == ceiling


@pytest.mark.parametrize("ceiling", [1, 2])
def test_a_load_at_its_ceiling_goes_no_higher(ceiling):
    control = ThrottleControl(ceiling=ceiling, range_bytes=1, max_range_bytes=1)
    assert control.concurrency == ceiling
    assert not control.answered()


def test_a_burst_of_503s_is_one_decrease():
    control = at_ceiling(ThrottleControl(8, 256 * KiB, 4096 * KiB))
    epoch = control.epoch()  # 8 requests sent together, all throttled (request rate)
    decreased = [control.throttled(epoch) for _ in range(8)]
    assert decreased == [True] + [False] * 7
    assert (control.concurrency, control.range_bytes) == (1, RANGE_GROWTH * 256 * KiB)
    stats = control.stats()
    assert (stats.throttled, stats.decreases, stats.min_concurrency) == (8, 1, 1)


def test_after_a_throttle_a_slow_start_up_to_half_then_one_more_per_round():
    control = at_ceiling(ThrottleControl(8, 64 * KiB, 64 * KiB))
    control.throttled(control.epoch())
    assert control.concurrency == 1
    script = [control.answered() for _ in range(3 + 4 + 5 + 6 + 7 + 20)]
    trace = [i for i, up in enumerate(script) if up]
    # One answer each to 2, 3 and 4 (half of 8); then a round as long as the limit: 4 answers
    # to 5, 5 more to 6, ...
    assert trace == [0, 1, 2, 6, 11, 17, 24]
    assert control.concurrency == 8 and control.stats().concurrency == 8


def test_egress_throttling_lowers_concurrency_and_leaves_ranges():
    control = at_ceiling(ThrottleControl(8, 1024 * KiB, 8192 * KiB))
    assert control.throttled(control.epoch(), retry_after=1.0, by_rate=False)
    assert (control.concurrency, control.range_bytes) == (1, 1024 * KiB)
    assert control.throttled(control.epoch())  # then by request rate: ranges grow
    assert control.range_bytes == RANGE_GROWTH * 1024 * KiB


def test_each_new_burst_decreases_again_and_ranges_stop_at_the_slot():
    control = ThrottleControl(ceiling=8, range_bytes=1024 * KiB, max_range_bytes=4096 * KiB)
    for _ in range(5):
        control.throttled(control.epoch())
    assert control.concurrency == 1
    assert control.range_bytes == 4096 * KiB  # the staging slot: a landing takes no more
    assert control.stats().decreases == 5


def test_a_scripted_mix_of_503s_and_successes():
    control = ThrottleControl(ceiling=16, range_bytes=1024 * KiB, max_range_bytes=8192 * KiB)
    trace = []
    for answer in "S" * 6 + "TTT" + "S" * 8 + "T" + "S" * 12:
        if answer == "T":
            control.throttled(control.epoch())
        else:
            control.answered()
        trace.append((control.concurrency, control.range_bytes // KiB))
    assert trace[5] == (16, 1024)  # no slow start on a node never throttled
    # Three throttled answers, each to a request sent after the last decrease: three decreases,
    # each growing the ranges; the first leaves half of 8 to come back to quickly, the others
    # (at a limit of 1) leave 1.
    assert trace[8] == (1, 8192)
    assert trace[9] == (2, 8192)  # threshold 1: a round of one answer
    assert trace[16] == (4, 8192)  # 2 answers to 3, 3 more to 4, then 3 of the next round
    assert trace[17] == (1, 8192)  # throttled again
    # A slow start to 2 (half of 4), then rounds of 2, 3 and 4 answers: 10, and 2 of the next.
    assert trace[-1] == (5, 8192)
    assert control.stats().throttled == 4


def test_stale_throttled_answers_do_not_decrease_again():
    control = at_ceiling(ThrottleControl(ceiling=8, range_bytes=1, max_range_bytes=1))
    before = control.epoch()
    assert control.throttled(control.epoch())
    assert not control.throttled(before)  # sent before the decrease
    assert control.stats().decreases == 1


@pytest.mark.parametrize(
    ("ceiling", "range_bytes", "message"),
    [(0, 1024, "concurrency ceiling"), (4, 0, "range size")],
)
def test_bad_limits_are_refused(ceiling, range_bytes, message):
    with pytest.raises(ValueError, match=message):
        ThrottleControl(ceiling, range_bytes, range_bytes)


def test_a_start_larger_than_the_maximum_is_kept_and_not_grown():
    control = ThrottleControl(ceiling=2, range_bytes=8 * KiB, max_range_bytes=4 * KiB)
    control.throttled(control.epoch())
    assert control.range_bytes == 8 * KiB


def test_loads_on_one_node_share_one_budget(tmp_path):
    # Two loads on one node (two processes in practice: the state is a file in the cache
    # directory's locks). One is throttled with a Retry-After: the other makes the same decrease
    # before its next request, and stays away as long.
    a = at_ceiling(ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path)))
    b = at_ceiling(ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path)))
    assert b.node_wait() == 0.0
    assert a.throttled(a.epoch(), retry_after=30.0)
    assert a.concurrency == 1
    assert b.concurrency == 8  # until it next sends
    b.epoch()
    assert (b.concurrency, b.range_bytes) == (1, RANGE_GROWTH * 64 * KiB)
    assert 25.0 < b.node_wait() <= 30.0
    b.epoch()
    assert b.stats().decreases == 1  # one published decrease is made once
    a.epoch()
    assert a.stats().decreases == 1  # its own is not made twice
    assert b.stats().node_decreases == 1
    assert a.stats().node_decreases == 0


def test_a_load_starting_after_the_nodes_decrease_starts_where_the_node_came_to(tmp_path):
    a = at_ceiling(ThrottleControl(16, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path)))
    a.throttled(a.epoch())  # published: half of 16, and ranges of 4 x 64 KiB
    c = ThrottleControl(16, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path))
    assert (c.concurrency, c.range_bytes) == (1, RANGE_GROWTH * 64 * KiB)
    c.epoch()
    assert c.stats().decreases == 0  # what was published before it started is where it starts
    trace = []
    while c.concurrency < 16:
        c.answered()
        trace.append(c.concurrency)
    # A slow start up to the node's 8, then one more per round of answers.
    assert trace[:9] == [2, 3, 4, 5, 6, 7, 8, 8, 8]


def test_a_load_on_another_node_or_long_after_starts_at_its_ceiling(tmp_path, monkeypatch):
    a = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path / "node1"))
    (tmp_path / "node1").mkdir()
    a.throttled(a.epoch(), by_rate=True)
    other = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path / "node2"))
    assert (other.concurrency, other.range_bytes) == (8, 64 * KiB)
    # The node's memory window: a decrease older than NODE_MEMORY_SECONDS is no reason.
    later = time.time() + throttle.NODE_MEMORY_SECONDS + 1
    monkeypatch.setattr(throttle.time, "time", lambda: later)
    c = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path / "node1"))
    assert (c.concurrency, c.range_bytes) == (8, 64 * KiB)
    assert c.node_wait() == 0.0


def test_one_burst_on_a_node_is_one_decrease_per_load(tmp_path):
    # Four loads at 64 in flight are each refused once in one burst, each before it looks at the
    # node: each decreases for its own 503 and publishes it; the others' publications of the same
    # burst, seen later, are not decreases again.
    loads = [at_ceiling(ThrottleControl(64, 1, 1, NodeThrottle(tmp_path))) for _ in range(4)]
    epochs = [load.epoch() for load in loads]
    for load, epoch in zip(loads, epochs, strict=True):
        assert load.throttled(epoch, retry_after=0.0, by_rate=False)
    for load in loads:
        load.epoch()
        assert (load.stats().decreases, load.stats().node_decreases) == (1, 0)
    # The threshold is half of 64 each: a slow start from one request back up to 32.
    for load in loads:
        while load.concurrency < 32:
            assert load.answered()
        assert not load.answered()  # 32: one more per round from here


def test_a_partners_decrease_in_a_later_burst_is_made(tmp_path, monkeypatch):
    a = at_ceiling(ThrottleControl(64, 1, 1, NodeThrottle(tmp_path)))
    b = at_ceiling(ThrottleControl(64, 1, 1, NodeThrottle(tmp_path)))
    a.throttled(a.epoch())
    b.epoch()  # a's decrease, made by b
    later = time.time() + 2 * throttle.ACCOUNT_WINDOW_SECONDS
    monkeypatch.setattr(throttle.time, "time", lambda: later)
    b.throttled(b.epoch())  # a new burst, b's own
    a.epoch()
    assert (a.stats().decreases, a.stats().node_decreases) == (2, 1)
    assert (b.stats().decreases, b.stats().node_decreases) == (2, 1)


def test_a_node_state_rewritten_with_a_lower_generation_is_news(tmp_path, monkeypatch):
    a = at_ceiling(ThrottleControl(64, 1, 1, NodeThrottle(tmp_path)))
    for _ in range(3):
        NodeThrottle(tmp_path).publish(0.0, 8, 1)
    a.epoch()  # generation 3, followed
    assert a.stats().node_decreases == 1
    # The file becomes unreadable (a reader sees no state: resynced, no decrease), then is
    # written again from generation 1, later: a decrease the load must make.
    (tmp_path / NodeThrottle.FILE).write_bytes(b"garbage")
    a.epoch()
    assert a.stats().node_decreases == 1
    later = time.time() + 2 * throttle.ACCOUNT_WINDOW_SECONDS
    monkeypatch.setattr(throttle.time, "time", lambda: later)
    assert NodeThrottle(tmp_path).publish(0.0, 8, 1) == 1
    a.epoch()
    assert a.stats().node_decreases == 2
    # Written again with a lower generation, never unreadable in between: news too.
    (tmp_path / NodeThrottle.FILE).unlink()
    later += 2 * throttle.ACCOUNT_WINDOW_SECONDS
    for _ in range(3):
        NodeThrottle(tmp_path).publish(0.0, 8, 1)
    a.epoch()
    assert a.stats().node_decreases == 3
    (tmp_path / NodeThrottle.FILE).write_bytes(b"")
    later += 2 * throttle.ACCOUNT_WINDOW_SECONDS
    NodeThrottle(tmp_path).publish(0.0, 8, 1)  # generation 1 < 3, unseen in between
    a.epoch()
    assert a.stats().node_decreases == 4


def test_a_read_older_than_the_load_s_own_publication_is_no_news(tmp_path, monkeypatch):
    # A thread reads the node's state, another thread of the load publishes its own decrease,
    # then the first compares what it read: an older generation, but no news.
    class Stale(NodeThrottle):
        stale: throttle.NodeState | None = None

        def state(self) -> throttle.NodeState:
            if self.stale is not None:
                state, self.stale = self.stale, None
                return state
            return super().state()

    node = Stale(tmp_path)
    control = at_ceiling(ThrottleControl(8, 1, 1, node))
    NodeThrottle(tmp_path).publish(0.0, 4, 1)
    control.epoch()  # the partner's decrease, made
    node.stale = node.state()
    later = time.time() + 2 * throttle.ACCOUNT_WINDOW_SECONDS
    monkeypatch.setattr(throttle.time, "time", lambda: later)
    assert control.throttled(control.epoch())  # its own, published: generation 2
    control.epoch()  # reads generation 1
    assert (control.stats().decreases, control.stats().node_decreases) == (2, 1)


def test_the_node_state_file_names_its_format_version():
    # Another version's file (throttle.state, of another layout) is not this one's.
    assert NodeThrottle.FILE == "throttle.v2.state"


def test_a_request_reads_the_node_state_once(tmp_path):
    reads = []

    class Counted(NodeThrottle):
        def state(self):
            reads.append(1)
            return super().state()

    control = at_ceiling(ThrottleControl(8, 1, 1, Counted(tmp_path)))
    stopping = threading.Event()
    reads.clear()
    # What BlobRangeReader does per request when nothing makes it wait.
    assert control.node_wait() == 0.0
    assert control.acquire(stopping, 1, follow=False)
    control.epoch(follow=False)
    assert len(reads) == 1
    control.release()


def test_an_unreadable_node_state_is_no_state(tmp_path):
    (tmp_path / NodeThrottle.FILE).write_bytes(b"not a state")
    node = NodeThrottle(tmp_path)
    assert (node.state().generation, wait_left(node)) == (0, 0.0)
    assert node.publish(0.0, 4, 1024) == 1  # rewritten whole
    assert (node.state().concurrency, node.state().range_bytes) == (4, 1024)
    missing = NodeThrottle(tmp_path / "absent")
    assert missing.publish(1.0) == 0  # cannot be written: the load adapts alone
    assert wait_left(missing) == 0.0


def test_requests_in_flight_never_pass_the_limit():
    control = at_ceiling(ThrottleControl(ceiling=4, range_bytes=1, max_range_bytes=1))
    stopping = threading.Event()
    assert all(control.acquire(stopping) for _ in range(4))
    control.throttled(control.epoch())  # limit 1, 4 in flight: none more until 3 are back
    got = []
    waiter = threading.Thread(target=lambda: got.append(control.acquire(stopping)))
    waiter.start()
    control.release()
    control.release()
    assert got == []
    control.release()
    control.release()  # none in flight: the waiter's turn
    waiter.join(timeout=10)
    assert got == [True]
    stopping.set()
    assert control.acquire(stopping) is False  # a stopped load stops waiting


def test_a_request_waits_for_the_decrease_its_node_published(tmp_path):
    a = at_ceiling(ThrottleControl(4, 1, 1, NodeThrottle(tmp_path)))
    b = at_ceiling(ThrottleControl(4, 1, 1, NodeThrottle(tmp_path)))
    stopping = threading.Event()
    assert b.acquire(stopping)  # one in flight
    a.throttled(a.epoch())
    got = []
    waiter = threading.Thread(target=lambda: got.append(b.acquire(stopping)))
    waiter.start()
    waiter.join(timeout=0.5)
    assert got == []  # b's limit is 1 now, before its next request goes
    b.release()
    waiter.join(timeout=10)
    assert got == [True]


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}\nErrorCode:ServerBusy")
        self.status_code = 503
        self.reason = reason


def test_egress_and_request_rate_throttling_are_told_apart():
    assert throttled_by_bandwidth(_Refused("Egress is over the account limit."))
    assert throttled_by_bandwidth(_Refused("Ingress is over the account limit."))
    assert not throttled_by_bandwidth(_Refused("Operations per second is over the account limit."))
    assert not throttled_by_bandwidth(_Refused("The server is busy."))
    assert not throttled_by_bandwidth(_Refused("Not the egress is over the account limit."))
    refused = _Refused("Egress is over the account limit.")
    refused.status_code = 429  # only a 503 is ever egress throttling
    assert not throttled_by_bandwidth(refused)


def _http_error(reason: str, message: str, code: str = "ServerBusy") -> Exception:
    """What the SDK raises for a 503 (azure-core's HttpResponseError, with the storage error body
    deserialized into its model), built from a requests response."""
    import requests
    from azure.core.exceptions import HttpResponseError
    from azure.core.pipeline.transport import HttpRequest, RequestsTransportResponse
    from azure.storage.blob._generated.models import StorageError

    raw = requests.Response()
    raw.status_code, raw.reason = 503, reason
    raw.headers.update({"x-ms-error-code": code, "Content-Type": "application/xml"})
    raw._content = (
        f"<?xml version='1.0' encoding='utf-8'?><Error><Code>{code}</Code>"
        f"<Message>{message}</Message></Error>"
    ).encode()
    response = RequestsTransportResponse(HttpRequest("GET", "https://a.blob/c/b"), raw)
    return HttpResponseError(response=response, model=StorageError(message=message))


def test_egress_throttling_is_told_from_the_sdk_s_own_error():
    egress = "Egress is over the account limit."
    assert throttled_by_bandwidth(_http_error(egress, egress))
    assert throttled_by_bandwidth(_http_error("Service Unavailable", egress))  # the body says
    rate = "Operations per second is over the account limit."
    assert not throttled_by_bandwidth(_http_error(rate, rate))
    assert not throttled_by_bandwidth(_http_error("Service Unavailable", "The server is busy."))
    # Another error code with the same text is not ServerBusy throttling.
    assert not throttled_by_bandwidth(_http_error(egress, egress, code="InternalError"))


def test_a_load_never_takes_its_own_published_decrease_for_another_load_s(tmp_path):
    # While one thread publishes this load's decrease, another thread of the same load looks at
    # the node's state: it must not count the new generation as another load's decrease (and
    # decrease a second time).
    looked: list[threading.Thread] = []

    class LookingWhilePublishing(NodeThrottle):
        def publish(
            self, retry_after: float, concurrency: int = 0, range_bytes: int = 0, kind: int = 0
        ) -> int:
            generation = super().publish(retry_after, concurrency, range_bytes, kind)
            other = threading.Thread(target=control.epoch)  # another GET about to be sent
            other.start()
            other.join(timeout=0.5)  # blocked until the publishing thread is done, when correct
            looked.append(other)
            return generation

    control = at_ceiling(ThrottleControl(8, 64 * KiB, 1024 * KiB, LookingWhilePublishing(tmp_path)))
    assert control.throttled(control.epoch(), 1.0, by_rate=False)
    looked[0].join()
    stats = control.stats()
    assert (stats.decreases, stats.node_decreases) == (1, 0)


# -- pacing: a throttled load's requests keep to a rate (scripted clock; no timings) -------------
MiB = 1 << 20


class Clock:
    """A scripted clock for the pacing: seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def goes_now(control: ThrottleControl, size: int) -> bool:
    """Whether a request of `size` bytes would be sent at once (not held for its pace): with the
    stop already set, acquire() returns False instead of waiting. A request let go is answered
    with nothing (it is booked with the pacers, as a sent one is)."""
    stopped = threading.Event()
    stopped.set()
    if not control.acquire(stopped, size):
        return False
    control.release()
    return True


def served(control: ThrottleControl, clock: Clock, answers: int, size: int, seconds: float) -> None:
    """`answers` requests of `size` bytes, one after another, over `seconds` of the clock (use
    fractions a float holds exactly)."""
    for _ in range(answers):
        assert control.acquire(threading.Event(), size)
        clock.now += seconds / answers
        control.release()
        control.answered(size)


def test_an_unthrottled_load_is_never_paced():
    clock = Clock()
    control = ThrottleControl(8, MiB, 32 * MiB, clock=clock)
    served(control, clock, 256, MiB, 2.0)  # 128 MiB/s, as fast as the account answers
    assert all(goes_now(control, MiB) for _ in range(50))  # 50 at one instant: none held
    stats = control.stats()
    assert (stats.pace_bytes_per_second, stats.pace_requests_per_second) == (None, None)


def test_egress_throttling_paces_bytes_from_what_was_served():
    clock = Clock()
    control = ThrottleControl(8, MiB, 32 * MiB, clock=clock)
    served(control, clock, 16, MiB, 2.0)  # 8 MiB/s over the last second
    control.throttled(control.epoch(), retry_after=1.0, by_rate=False)
    pace = throttle.PACE_DECREASE * 8 * MiB
    assert control.stats().pace_bytes_per_second == pytest.approx(pace)
    assert control.stats().pace_requests_per_second is None  # egress paces bytes only
    # A request waits for its bytes' time: 1 MiB goes, the next one only 1 MiB / pace later.
    assert goes_now(control, MiB)
    assert not goes_now(control, MiB)
    clock.now += 2 * MiB / pace + 1e-6  # the time of both booked above
    assert goes_now(control, MiB)


def test_the_pace_is_cut_once_per_burst_and_raised_per_interval_without_one():
    clock = Clock()
    control = ThrottleControl(8, MiB, 32 * MiB, clock=clock)
    served(control, clock, 8, MiB, 1.0)
    control.throttled(control.epoch(), by_rate=False)
    start = throttle.PACE_DECREASE * 8 * MiB
    clock.now += 0.5  # another 503 within the interval: the same burst, no second cut
    assert control.throttled(control.epoch(), by_rate=False)  # (a concurrency decrease)
    assert control.stats().pace_bytes_per_second == pytest.approx(start)
    clock.now += 0.6  # a new burst: cut again
    control.throttled(control.epoch(), by_rate=False)
    cut = start * throttle.PACE_DECREASE
    assert control.stats().pace_bytes_per_second == pytest.approx(cut)
    clock.now += 3.5  # three whole intervals unthrottled: three steps of 2 ranges' bytes
    step = throttle.PACE_STEP_REQUESTS * MiB / throttle.ACCOUNT_WINDOW_SECONDS
    assert control.stats().pace_bytes_per_second == pytest.approx(cut + 3 * step)
    for _ in range(12):  # cut after cut: never under one step
        clock.now += 1.0
        control.throttled(control.epoch(), by_rate=False)
    assert control.stats().pace_bytes_per_second == pytest.approx(step)


def test_request_rate_throttling_paces_requests_and_grows_ranges_when_held():
    clock = Clock()
    control = ThrottleControl(8, MiB, 64 * MiB, clock=clock)
    served(control, clock, 32, MiB, 1.0)  # 32 requests in the second before the 503
    control.throttled(control.epoch())  # request rate: ranges grow, requests are paced
    assert control.range_bytes == RANGE_GROWTH * MiB
    assert control.stats().pace_requests_per_second == pytest.approx(32 * throttle.PACE_DECREASE)
    assert control.stats().pace_bytes_per_second is None
    assert goes_now(control, MiB)
    assert not goes_now(control, MiB)  # held: the next ranges carry more bytes
    assert control.range_bytes == RANGE_GROWTH**2 * MiB
    assert not goes_now(control, MiB)
    assert control.range_bytes == 64 * MiB  # up to the staging slot, not past it


def test_a_young_load_s_first_request_pace_counts_the_whole_window_its_bytes_pace_its_age():
    # Throttled a quarter of a second into the load, after 8 answers of 1 MiB. By request rate:
    # the account served it 8 requests in its window, not 32 per second (what it served at the
    # opening was mostly the burst allowance every load of a fleet drew on at once). By egress:
    # 32 MiB/s, its rate since its first request (a bytes pace set low costs the load bytes).
    clock = Clock()
    by_rate = ThrottleControl(8, MiB, 64 * MiB, clock=clock)
    served(by_rate, clock, 8, MiB, 0.25)
    by_rate.throttled(by_rate.epoch())
    assert by_rate.stats().pace_requests_per_second == pytest.approx(8 * throttle.PACE_DECREASE)
    by_egress = ThrottleControl(8, MiB, 64 * MiB, clock=clock)
    served(by_egress, clock, 8, MiB, 0.25)
    by_egress.throttled(by_egress.epoch(), by_rate=False)
    pace = by_egress.stats().pace_bytes_per_second
    assert pace == pytest.approx(32 * MiB * throttle.PACE_DECREASE)


def test_the_concurrency_is_not_raised_while_the_pace_holds_requests():
    clock = Clock()
    control = at_ceiling(ThrottleControl(4, MiB, MiB, clock=clock))
    served(control, clock, 8, MiB, 1.0)
    control.throttled(control.epoch(), by_rate=False)
    assert control.concurrency == 1
    assert goes_now(control, MiB)
    assert not goes_now(control, MiB)  # held by the pace
    assert not control.answered(MiB)  # the pace, not the concurrency, is what holds it back
    clock.now += 10.0
    assert goes_now(control, MiB)  # not held: answers raise the concurrency again
    assert control.answered(MiB) and control.concurrency == 2


def test_a_throttle_before_any_answer_lowers_concurrency_only():
    clock = Clock()
    control = ThrottleControl(8, MiB, MiB, clock=clock)
    assert control.acquire(threading.Event(), MiB)
    control.release()
    control.throttled(control.epoch(), by_rate=False)  # nothing measured: nothing to pace from
    assert control.concurrency == 1
    assert control.stats().pace_bytes_per_second is None
    assert goes_now(control, MiB) and goes_now(control, MiB)


def test_a_node_partners_throttle_cuts_a_pace_but_starts_none(tmp_path, monkeypatch):
    clock = Clock()
    a = ThrottleControl(8, MiB, MiB, NodeThrottle(tmp_path), clock=clock)
    b = ThrottleControl(8, MiB, MiB, NodeThrottle(tmp_path), clock=clock)
    served(a, clock, 8, MiB, 1.0)
    a.throttled(a.epoch(), by_rate=False)
    # b follows the node's decrease before its first request: concurrency, not a pace (it had
    # measured nothing yet)
    served(b, clock, 8, MiB, 1.0)
    assert b.stats().node_decreases == 1 and b.stats().pace_bytes_per_second is None
    later = time.time() + 1.5  # b's 503 comes in a later burst than a's (not as a's partner)
    monkeypatch.setattr(throttle.time, "time", lambda: later)
    b.throttled(b.epoch(), by_rate=False)  # its own 503: paced from what it was served
    b_pace = b.stats().pace_bytes_per_second
    assert b_pace is not None
    clock.now += 1.5
    a_pace = a.stats().pace_bytes_per_second
    a.epoch()  # b's decrease, published: a cuts the pace it has (a new burst for a)
    assert a.stats().pace_bytes_per_second == pytest.approx(a_pace * throttle.PACE_DECREASE)
    assert NodeThrottle(tmp_path).state().kind == throttle.EGRESS


# -- the node's state is input: whoever can write the directory can write it --------------------
def record(generation=1, wait=10.0, ahead=0.0, concurrency=4, range_bytes=1024, kind=0) -> bytes:
    """A throttle.v2.state record as a loader writes it (published now, staying away 10 s),
    with fields replaced (wait: the seconds from its stamp to its until; ahead: its stamp's
    seconds past now)."""
    stamp = time.time() + ahead
    return struct.pack("<qddqqq", generation, stamp + wait, stamp, concurrency, range_bytes, kind)


def untouched(tmp_path) -> int:
    """The concurrency a load of ceiling 8 starts at on a node whose state nobody wrote."""
    return ThrottleControl(8, 1, 1, NodeThrottle(tmp_path / "untouched")).concurrency


def finishes(fn, *args):
    """fn(*args), run on a thread that must end (a hang guard, not a timing): its result."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), f"{fn.__name__} hangs"
    return result[0]


def test_a_record_a_loader_writes_is_read(tmp_path):
    (tmp_path / NodeThrottle.FILE).write_bytes(record(generation=3, concurrency=4))
    state = NodeThrottle(tmp_path).state()
    assert (state.generation, state.concurrency, state.range_bytes) == (3, 4, 1024)
    assert 5.0 < wait_left(NodeThrottle(tmp_path)) <= 10.0


@pytest.mark.parametrize(
    "fields",
    [
        {"wait": 1e9},  # a wait no loader asks for: past retry_throttled_seconds
        {"wait": 121.0},
        {"ahead": 3600.0},  # published in the future
        {"wait": math.inf},
        {"wait": math.nan},
        {"ahead": math.nan},
        {"ahead": -math.inf},
        {"generation": (1 << 63) - 1},  # struct.error on the next publication, before
        {"generation": -5},
        {"concurrency": 100_000},  # past prefetch_concurrency's limit
        {"concurrency": -1},
        {"range_bytes": 1 << 40},  # past the largest range (chunk_bytes, staging_slot_bytes)
        {"range_bytes": -1},
        {"kind": 9},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}" for k, v in f.items()),
)
def test_a_record_no_loader_could_write_is_ignored_then_overwritten(tmp_path, fields):
    (tmp_path / NodeThrottle.FILE).write_bytes(record(**fields))
    node = NodeThrottle(tmp_path)
    assert node.state() == throttle.NodeState() and wait_left(node) == 0.0
    # A load on that node neither waits nor starts otherwise than on an untouched node.
    control = ThrottleControl(8, 1, 1, NodeThrottle(tmp_path))
    assert control.concurrency == untouched(tmp_path) and control.node_wait() == 0.0
    # The next decrease writes a record of its own over it.
    assert node.publish(2.0, 4, 1024) == 1
    state = node.state()
    assert (state.generation, state.concurrency, state.range_bytes) == (1, 4, 1024)
    assert 0.0 < wait_left(node) <= 2.0


def test_a_wait_is_bounded_by_the_load_s_retry_throttled_seconds(tmp_path):
    (tmp_path / NodeThrottle.FILE).write_bytes(record(wait=60.0))
    assert wait_left(NodeThrottle(tmp_path)) > 50.0  # within the default 120 s
    assert wait_left(NodeThrottle(tmp_path, max_wait_seconds=30.0)) == 0.0
    # A publication asks for no more than that either, and never keeps a forged wait.
    node = NodeThrottle(tmp_path, max_wait_seconds=30.0)
    node.publish(1e9)
    assert 25.0 < wait_left(node) <= 30.0


def test_publishing_keeps_the_longest_wait_only_while_a_loader_could_have_asked_it(tmp_path):
    node = NodeThrottle(tmp_path)
    node.publish(60.0)
    node.publish(1.0)
    assert wait_left(node) > 50.0  # the longer wait of the node's loads holds
    (tmp_path / NodeThrottle.FILE).write_bytes(record(wait=1e6))
    node.publish(1.0)
    assert wait_left(node) <= 1.0  # a forged one does not stick


def test_a_fifo_at_the_state_path_is_no_state_and_is_replaced(tmp_path):
    os.mkfifo(tmp_path / NodeThrottle.FILE)  # opened for reading, a FIFO blocks without a writer
    node = NodeThrottle(tmp_path)
    assert finishes(node.state) == throttle.NodeState()
    assert finishes(ThrottleControl, 8, 1, 1, node).concurrency == untouched(tmp_path)
    assert finishes(node.publish, 1.0, 4, 1024) == 1
    assert (tmp_path / NodeThrottle.FILE).is_file() and node.state().concurrency == 4


def test_a_symlink_at_the_state_path_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(record(generation=7))  # even a valid record is not read through a link
    path = tmp_path / "locks" / NodeThrottle.FILE
    path.parent.mkdir()
    path.symlink_to(victim)
    node = NodeThrottle(path.parent)
    assert node.state() == throttle.NodeState()
    before = victim.read_bytes()
    assert node.publish(1.0, 4, 1024) == 1
    assert victim.read_bytes() == before  # unchanged
    assert not path.is_symlink() and node.state().generation == 1


def test_a_link_to_dev_zero_and_a_huge_file_are_read_bounded(tmp_path):
    import tracemalloc

    path = tmp_path / NodeThrottle.FILE
    path.symlink_to("/dev/zero")
    node = NodeThrottle(tmp_path)
    assert finishes(node.state) == throttle.NodeState()
    assert Path("/dev/zero").is_char_device()  # (publish replaces the link, not the device)
    assert node.publish(1.0) == 1 and not path.is_symlink()
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(256 << 20)  # sparse: 256 MiB read whole on every request, before
    tracemalloc.start()
    try:
        assert node.state() == throttle.NodeState()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert node.publish(1.0, 4, 1024) == 1 and path.stat().st_size == 48


def test_a_hard_link_at_the_state_path_is_replaced_not_written(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"the loader's own file")
    (tmp_path / "locks").mkdir()
    os.link(victim, tmp_path / "locks" / NodeThrottle.FILE)
    assert NodeThrottle(tmp_path / "locks").publish(1.0, 4, 1024) == 1
    assert victim.read_bytes() == b"the loader's own file"
