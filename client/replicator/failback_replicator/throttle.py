"""Token bucket for the failback replication configuration's bandwidthThrottling (Mbps)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """Limits a byte stream to `mbps` megabits per second (0/None = unlimited).

    The burst is a quarter second of traffic (at least one block) so that the rate is smooth at
    the scale of a progress line while single 1 MiB blocks still pass.
    """

    def __init__(
        self,
        mbps: float | None,
        min_burst: int = 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._min_burst = min_burst
        self.set_rate(mbps)

    def set_rate(self, mbps: float | None) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.mbps = mbps if mbps and mbps > 0 else None
            self.rate = self.mbps * 1_000_000 / 8 if self.mbps else 0.0
            self.burst = max(self._min_burst, int(self.rate / 4))
            self.tokens = float(self.burst)
            self.stamp = self._clock()

    def consume(self, n: int) -> float:
        """Blocks until `n` bytes may go; returns the seconds waited."""
        with self._lock:
            if not self.rate:
                return 0.0
            now = self._clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
