"""`Pacer`: holds a copy to an average rate, so that a background pre-copy
leaves the source's engine its memory bandwidth and cores (QEMU's
migrate-set-speed, for KV). The puller calls `spent(nbytes)` after each
piece it copied; the pacer sleeps until the copy is back under the rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# A paced pull must stay above the rate a source waits for before it gives
# up on the puller (transfer.session.MIN_COPY_RATE, 100 MB/s).
MIN_RATE_BYTES_PER_S = 128 << 20


class Pacer:
    """Average-rate limiter over one pull. `bytes_per_s` 0 means no limit."""

    def __init__(self, bytes_per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if bytes_per_s < 0:
            raise ValueError(f"bytes_per_s must be >= 0, got {bytes_per_s}")
        self.bytes_per_s = float(bytes_per_s)
        self._clock, self._sleep = clock, sleep
        self._start = clock()
        self._bytes = 0
        self.slept_s = 0.0

    @property
    def limited(self) -> bool:
        return self.bytes_per_s > 0

    def spent(self, nbytes: int) -> None:
        """Account `nbytes` just copied; sleep until the average is back at the rate."""
        if not self.limited:
            return
        self._bytes += nbytes
        wait = self._start + self._bytes / self.bytes_per_s - self._clock()
        if wait > 0:
            self._sleep(wait)
            self.slept_s += wait


def pieces(total: int, piece: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most `piece` (>= 1) covering range(total)."""
    piece = max(1, piece)
    return [(lo, min(lo + piece, total)) for lo in range(0, total, piece)]
