"""Producer pacing: backpressure reads the queue depth once per several chunks and never passes the high mark;
the cancel flag is asked at most once per period."""

from __future__ import annotations

from sam3_batch.producer.backpressure import Backpressure
from sam3_batch.producer.cancel_check import CancelCheck


class _Queue:
    """A queue that only the producer fills (one chunk per send) and that drains when asked to."""

    def __init__(self) -> None:
        self.depth, self.reads, self.deepest = 0, 0, 0

    def read(self) -> int:
        self.reads += 1
        return self.depth

    def send(self) -> None:
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)


def test_the_depth_is_read_about_once_per_quarter_band_and_the_queue_stays_at_or_below_high_water() -> None:
    queue = _Queue()

    def drain(_: float) -> None:  # a fleet draining while the producer waits
        queue.depth = max(0, queue.depth - 300)

    backpressure = Backpressure(queue.read, high=2000, low=1000, sleep=drain)
    for _ in range(10_000):
        backpressure.wait_for_room()
        queue.send()

    assert queue.deepest <= 2000
    assert backpressure.pauses >= 1
    assert queue.reads < 10_000 / 100  # vs one read per chunk before


def test_a_narrow_band_reads_the_depth_before_every_chunk() -> None:
    queue = _Queue()
    backpressure = Backpressure(queue.read, high=4, low=1, sleep=lambda _: setattr(queue, "depth", 0))
    for _ in range(12):
        backpressure.wait_for_room()
        queue.send()
    assert queue.deepest <= 4 and queue.reads >= 12


def test_the_cancel_flag_is_asked_at_most_once_per_period_and_a_cancel_sticks() -> None:
    now, asked, answer = [0.0], [0], [False]

    def ask() -> bool:
        asked[0] += 1
        return answer[0]

    check = CancelCheck(ask, period_s=0.25, clock=lambda: now[0])
    assert [check() for _ in range(100)] == [False] * 100 and asked[0] == 1  # one chunk after another
    answer[0] = True
    now[0] = 0.2
    assert not check()  # within the period: not asked again
    now[0] = 0.3
    assert check() and asked[0] == 2
    answer[0] = False
    now[0] = 9.0
    assert check() and asked[0] == 2  # cancelled stays cancelled without asking Redis
