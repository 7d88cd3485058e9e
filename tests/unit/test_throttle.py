"""ThrottleControl on scripted sequences of throttled answers (429, 503) and successes: one burst
is one multiplicative decrease (concurrency halved, ranges doubled), a round of answers adds one
to the concurrency, and the user's settings bound both."""

from __future__ import annotations

import pytest
from blob2gpu.sources.azure.throttle import ThrottleControl

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
