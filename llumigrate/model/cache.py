"""Built-once folders in the model cache (the tiny model, its adapters):
concurrent callers serialise on an `fcntl` lock beside the folder; one
builds, the others reuse what it built."""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path


def build_once(target: Path, is_complete: Callable[[], bool], build: Callable[[], object]) -> Path:
    """`target`, built by `build()` unless `is_complete()` says it is there.
    Leftovers of a crashed build (`.<name>.tmp-*`, `.<name>.old-*`) are
    removed first."""
    if is_complete():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # NOTE: re-check under the lock: another process may have built it.
        if not is_complete():
            for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
                for stale in target.parent.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            build()
    return target
