"""`Pacer`: holds a copy to an average rate, so that a background pre-copy
leaves the source's engine its memory bandwidth and cores (QEMU's
migrate-set-speed, for KV). The puller calls `spent(nbytes)` after each
piece it copied; the pacer sleeps until the copy is back under the rate.

Time the copy fell behind the rate (a slow piece, a source slow to fill the
ring) is credit it may catch up at full speed, but at most `burst_s` of it: a
pull that stalled does not then burst through the engine's bandwidth at full
speed for as long as it stalled (a token bucket of `burst_s` x rate bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# A paced pull must stay above the rate a source waits for before it gives
# up on the puller (transfer.session.MIN_COPY_RATE, 100 MB/s).
MIN_RATE_BYTES_PER_S = 128 << 20
# How far behind the rate a pull may fall and still catch up at full speed.
DEFAULT_BURST_S = 0.05


class Pacer:
    """Rate limiter over one pull: `bytes_per_s` on average, with at most
    `burst_s` of catching up after the copy fell behind. `bytes_per_s` 0
    means no limit."""

    def __init__(self, bytes_per_s: float, *, burst_s: float = DEFAULT_BURST_S,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if bytes_per_s < 0:
            raise ValueError(f"bytes_per_s must be >= 0, got {bytes_per_s}")
        if burst_s < 0:
            raise ValueError(f"burst_s must be >= 0, got {burst_s}")
        self.bytes_per_s, self.burst_s = float(bytes_per_s), float(burst_s)
        self._clock, self._sleep = clock, sleep
        self._due = clock()      # when the bytes accounted so far are due at the rate
        self.slept_s = 0.0

    @property
    def limited(self) -> bool:
        return self.bytes_per_s > 0

    def spent(self, nbytes: int) -> None:
        """Account `nbytes` just copied; sleep until the average is back at the rate."""
        if not self.limited:
            return
        now = self._clock()
        self._due = max(self._due, now - self.burst_s) + nbytes / self.bytes_per_s
        wait = self._due - now
        if wait > 0:
            self._sleep(wait)
            self.slept_s += wait


def pieces(total: int, piece: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of at most `piece` (>= 1) covering range(total)."""
    piece = max(1, piece)
    return [(lo, min(lo + piece, total)) for lo in range(0, total, piece)]
