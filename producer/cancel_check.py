"""How often the producer asks Redis whether its job was cancelled: at most every quarter of a second.

Asking before every chunk was one of the producer's three Redis round trips per chunk. A cancel is seen
a quarter second later at most; chunks sent meanwhile are dropped by workers, which check the flag too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CANCEL_CHECK_PERIOD_S = 0.25


class CancelCheck:
    """``ask()`` at most once per ``period_s``; once it says cancelled, the answer stays cancelled."""

    def __init__(self, ask: Callable[[], bool], period_s: float = CANCEL_CHECK_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ask, self._period_s, self._clock = ask, period_s, clock
        self._asked_at: float | None = None
        self._cancelled = False

    def __call__(self) -> bool:
        now = self._clock()
        if not self._cancelled and (self._asked_at is None or now - self._asked_at >= self._period_s):
            self._asked_at, self._cancelled = now, self._ask()
        return self._cancelled
