"""ThrottleControl on scripted sequences of throttled answers (429, 503) and successes: one burst
is one multiplicative decrease (concurrency halved, ranges doubled), a round of answers adds one
to the concurrency, and the user's settings bound both."""

from __future__ import annotations

import time

import pytest
from blob2gpu.sources.azure.throttle import NodeThrottle, ThrottleControl

KiB = 1 << 10


def test_a_burst_of_503s_is_one_decrease():
    control = ThrottleControl(ceiling=8, range_bytes=256 * KiB, max_range_bytes=4096 * KiB)
    epoch = control.epoch()  # 8 requests sent together, all throttled
    decreased = [control.throttled(epoch) for _ in range(8)]
    assert decreased == [True] + [False] * 7
    assert (control.concurrency, control.range_bytes) == (4, 512 * KiB)
    stats = control.stats()
    assert (stats.throttled, stats.decreases, stats.min_concurrency) == (8, 1, 4)


def test_each_new_burst_halves_again_down_to_one_and_ranges_stop_at_the_slot():
    control = ThrottleControl(ceiling=8, range_bytes=1024 * KiB, max_range_bytes=4096 * KiB)
    for _ in range(5):
        control.throttled(control.epoch())
    assert control.concurrency == 1
    assert control.range_bytes == 4096 * KiB  # the staging slot: a landing takes no more
    assert control.stats().decreases == 5


def test_answers_raise_concurrency_by_one_per_round_up_to_the_ceiling():
    control = ThrottleControl(ceiling=8, range_bytes=64 * KiB, max_range_bytes=64 * KiB)
    control.throttled(control.epoch())
    control.throttled(control.epoch())
    assert control.concurrency == 2
    script = [control.answered() for _ in range(2 + 3 + 4 + 5 + 6 + 7 + 20)]
    # A round is as many answers as the limit: 2 answers raise it to 3, 3 more to 4, ...
    raised = [i for i, up in enumerate(script) if up]
    assert raised == [1, 4, 8, 13, 19, 26]
    assert control.concurrency == 8  # prefetch_concurrency is a ceiling, never passed
    assert control.range_bytes == 64 * KiB  # ranges grown by throttling stay grown
    assert control.stats().concurrency == 8
    assert control.stats().min_concurrency == 2


def test_a_scripted_mix_of_503s_and_successes():
    control = ThrottleControl(ceiling=16, range_bytes=1024 * KiB, max_range_bytes=8192 * KiB)
    trace = []
    for answer in "TTTT" + "S" * 8 + "T" + "S" * 20:
        if answer == "T":
            control.throttled(control.epoch())
        else:
            control.answered()
        trace.append((control.concurrency, control.range_bytes // KiB))
    # A burst of 4 throttled answers to requests each sent after the last decrease: 4 decreases.
    assert trace[3] == (1, 8192)
    assert trace[4] == (2, 8192)  # one answer: a round at a limit of 1
    assert trace[11] == (4, 8192)  # 2 answers to 3, 3 more to 4, then 2 of the next round
    assert trace[12] == (2, 8192)  # throttled again: halved
    assert trace[-1] == (7, 8192)  # 20 answers: rounds of 2, 3, 4, 5 and 6
    assert control.stats().throttled == 5


def test_stale_throttled_answers_do_not_decrease_again():
    control = ThrottleControl(ceiling=8, range_bytes=1, max_range_bytes=1)
    before = control.epoch()
    assert control.throttled(control.epoch())
    assert not control.throttled(before)  # sent before the decrease
    assert control.concurrency == 4


@pytest.mark.parametrize(
    ("ceiling", "range_bytes", "message"),
    [(0, 1024, "concurrency ceiling"), (4, 0, "range size")],
)
def test_bad_limits_are_refused(ceiling, range_bytes, message):
    with pytest.raises(ValueError, match=message):
        ThrottleControl(ceiling=ceiling, range_bytes=range_bytes, max_range_bytes=1 << 20)


def test_a_start_larger_than_the_maximum_is_kept_and_not_grown():
    control = ThrottleControl(ceiling=2, range_bytes=8 * KiB, max_range_bytes=4 * KiB)
    control.throttled(control.epoch())
    assert control.range_bytes == 8 * KiB


def test_loads_on_one_node_share_one_budget(tmp_path):
    # Two loads on one node (two processes in practice: the state is a file in the cache's
    # locks directory). One is throttled with a Retry-After: the other makes the same decrease
    # before its next request, and stays away as long.
    a = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path))
    b = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path))
    assert b.node_wait() == 0.0
    assert a.throttled(a.epoch(), retry_after=30.0)
    assert a.concurrency == 4
    assert b.concurrency == 8  # until it next sends
    b.epoch()
    assert (b.concurrency, b.range_bytes) == (4, 128 * KiB)
    assert 25.0 < b.node_wait() <= 30.0
    b.epoch()
    assert b.concurrency == 4  # one published decrease is made once
    a.epoch()
    assert a.concurrency == 4  # its own is not made twice
    assert b.stats().node_decreases == 1 and b.stats().decreases == 1
    assert a.stats().node_decreases == 0
    # A load starting soon after makes one decrease, not one per decrease published before.
    a.throttled(a.epoch())
    c = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path))
    c.epoch()
    assert c.concurrency == 4 and c.stats().node_decreases == 1


def test_a_load_starting_long_after_the_last_decrease_starts_whole(tmp_path, monkeypatch):
    node = NodeThrottle(tmp_path)
    node.publish(1.0)
    import blob2gpu.sources.azure.throttle as throttle

    later = time.time() + throttle.NODE_RECENT_SECONDS + 1
    monkeypatch.setattr(throttle.time, "time", lambda: later)
    c = ThrottleControl(8, 64 * KiB, 1024 * KiB, NodeThrottle(tmp_path))
    c.epoch()
    assert c.concurrency == 8 and c.node_wait() == 0.0


def test_an_unreadable_node_state_is_no_state(tmp_path):
    (tmp_path / NodeThrottle.FILE).write_bytes(b"not a state")
    node = NodeThrottle(tmp_path)
    assert (node.generation(), node.wait_left()) == (0, 0.0)
    assert node.publish(0.0) == 1  # rewritten whole
    missing = NodeThrottle(tmp_path / "absent")
    assert missing.publish(1.0) == 0  # cannot be written: the load adapts alone
    assert missing.wait_left() == 0.0


def test_requests_in_flight_never_pass_the_limit():
    import threading

    control = ThrottleControl(ceiling=4, range_bytes=1, max_range_bytes=1)
    stopping = threading.Event()
    assert all(control.acquire(stopping) for _ in range(4))
    control.throttled(control.epoch())  # limit 2, 4 in flight: none more until 2 are back
    got = []
    waiter = threading.Thread(target=lambda: got.append(control.acquire(stopping)))
    waiter.start()
    control.release()
    control.release()
    control.release()  # 1 in flight: the waiter's turn
    waiter.join(timeout=10)
    assert got == [True]  # 2 in flight now, at the limit
    stopping.set()
    assert control.acquire(stopping) is False  # a stopped load stops waiting
