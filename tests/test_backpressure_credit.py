"""Backpressure reads the queue depth once per several chunks and still never passes the high-water mark."""

from __future__ import annotations

from sam3_batch.producer.backpressure import Backpressure


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
