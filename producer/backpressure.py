"""Keeps the queue between a low and a high water mark so Redis memory stays bounded for any job size."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


class QueueDepth:
    """Pending chunks in a Celery queue on Redis: the LIST named after the queue (what KEDA reads too)."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.client, self.queue = client, queue

    def __call__(self) -> int:
        return int(self.client.llen(self.queue))


class Backpressure:
    """Blocks the producer above ``high`` until the depth drops to ``low`` (hysteresis).

    The depth is read once per several chunks, not per chunk: only producers add to the queue, so after a
    reading of ``depth`` this producer may send ``high - depth`` chunks without passing the high mark.
    That credit is capped at a quarter of the band between the marks, so several producers on one queue
    overshoot it by at most a quarter band each. It saves one Redis round trip per chunk on the hot path.
    """

    def __init__(
        self, depth: Callable[[], int], high: int, low: int, poll_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 <= low < high:
            raise ValueError(f"need 0 <= low water < high water, got low={low} high={high}")
        self.depth, self.high, self.low, self.poll_s, self._sleep = depth, high, low, poll_s, sleep
        self.pauses = 0
        self._credit = 0
        self._max_credit = max(1, (high - low) // 4)

    def wait_for_room(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Return at once below the high mark; else wait until the queue drains to the low mark."""
        if self._credit > 0:
            self._credit -= 1
            return
        depth = self.depth()
        if depth < self.high:
            self._credit = min(self.high - depth, self._max_credit) - 1
            return
        self.pauses += 1
        log.info("queue at high water (%d chunks): pausing until it drains to %d", self.high, self.low)
        while self.depth() > self.low and not should_stop():
            self._sleep(self.poll_s)
