"""Side streams for KV copies on CUDA: a transfer thread's copies run on its
own stream, ordered after the work its caller already queued, and return
only when they have landed (so the engine may read the blocks at once)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
_local = threading.local()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's side stream on `device` (created once)."""
    streams: dict[int, torch.cuda.Stream] = _local.__dict__.setdefault("streams", {})
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    return streams[index]


def run_on_side_stream(device: torch.device, fn: Callable[[], T]) -> T:
    """Run `fn` with this thread's side stream current, then wait for the
    work it queued. NOTE: the side stream first waits (an event) for what the
    caller's current stream had queued, so `fn` sees every earlier write."""
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        result = fn()
    done = torch.cuda.Event()
    done.record(side)
    done.synchronize()
    return result
