"""`Progress`: a live status line on stderr (rewritten in place on a
terminal, one line every few seconds otherwise)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llumigrate.stress.runner import StressRunner

TTY_PERIOD_S, LOG_PERIOD_S = 1.0, 10.0


class Progress:
    def __init__(self, runner: StressRunner) -> None:
        self.r = runner
        self.t0 = time.monotonic()
        self._task: asyncio.Task | None = None
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        r = self.r
        done = sum(h.finished for h in r.handles.values())
        results = r.migrator.results
        ok = sum(m.committed for m in results)
        up = sum(i.up for i in r.cluster.instances.values())
        return (f"[stress {time.monotonic() - self.t0:5.0f}s] requests {done}/{len(r.workload.specs)} done"
                f" | migrations {ok} ok {len(results) - ok} aborted {sum(r.migrator.refused.values())} refused"
                f" | faults {len(r.injector.fired())} | instances {up} up,"
                f" {len(r.listener.downs)} lost | failovers {len(r.listener.failovers)}")

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TTY_PERIOD_S if self.tty else LOG_PERIOD_S)
            self._print()

    def _print(self, end: str = "") -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K" + self.line() + end)
        else:
            sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception):
                self._print("\n" if self.tty else "")
