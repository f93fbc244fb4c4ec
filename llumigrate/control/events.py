"""`EventBus`: what the scheduler tells watchers (dispatches, migration stages
and outcomes, instances up, down, drained, joining and leaving the cluster).

Publishing never blocks and never fails: each subscriber has a bounded queue;
when it is full the oldest event is dropped and the subscriber's next event
carries how many it lost (`Event.dropped`). `publish` may be called from the
event loop's thread or from any other thread.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

DISPATCH = "dispatch"                # request_id sent to instance_id
MIGRATION_STAGE = "migration_stage"  # detail: stage, blocks
MIGRATION_DONE = "migration_done"    # detail: state, reason, downtime_ms, total_ms
INSTANCE_UP = "instance_up"          # its health: answering again
INSTANCE_DOWN = "instance_down"      # detail: reason
DRAIN = "drain"
UNDRAIN = "undrain"
INSTANCE_JOINED = "instance_joined"  # membership: registered; detail: address
INSTANCE_LEFT = "instance_left"      # deregistered and removed; detail: address
KINDS = (DISPATCH, MIGRATION_STAGE, MIGRATION_DONE, INSTANCE_UP, INSTANCE_DOWN, DRAIN, UNDRAIN,
         INSTANCE_JOINED, INSTANCE_LEFT)

DEFAULT_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class Event:
    """One thing that happened. `seq` is set by the bus (one more per event
    published); `dropped` is set per subscriber (events it lost just before
    this one). A migration's `instance_id` is its source."""

    kind: str
    request_id: str = ""
    instance_id: str = ""
    destination_id: str = ""
    detail: Mapping[str, str] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    seq: int = 0
    dropped: int = 0


class Subscription:
    """An async iterator over the events published after it was made.

    Made by `EventBus.subscribe` inside a running event loop and consumed on
    that loop. Iteration ends when the bus closes or `close()` is called.
    """

    def __init__(self, bus: EventBus, maxsize: int, kinds: frozenset[str] | None) -> None:
        assert maxsize >= 1
        self._bus = bus
        self._kinds = kinds
        self._queue: deque[Event] = deque(maxlen=maxsize)
        self._lock = threading.Lock()
        self._dropped = 0
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()

    def offer(self, event: Event) -> None:
        """Queues `event` (dropping the oldest when full); any thread."""
        if self._kinds is not None and event.kind not in self._kinds:
            return
        with self._lock:
            if len(self._queue) == self._queue.maxlen:
                self._dropped += 1  # deque(maxlen) drops the oldest on append
            self._queue.append(event)
        self._wake()

    def close(self) -> None:
        """Ends iteration (after what is queued) and leaves the bus; idempotent."""
        self._closed = True
        self._bus.unsubscribe(self)
        self._wake()

    def _wake(self) -> None:
        try:
            if asyncio.get_running_loop() is self._loop:
                self._ready.set()
                return
        except RuntimeError:
            pass  # not on any loop's thread
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            pass  # the subscriber's loop is closed: nobody is waiting

    def _pop(self) -> Event | None:
        with self._lock:
            if not self._queue:
                return None
            event, dropped = self._queue.popleft(), self._dropped
            self._dropped = 0
        return replace(event, dropped=dropped) if dropped else event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            event = self._pop()
            if event is not None:
                return event
            if self._closed:
                raise StopAsyncIteration
            # NOTE: clear, then look again: an offer between the first look
            # and the clear has set the flag and queued its event.
            self._ready.clear()
            event = self._pop()
            if event is not None:
                return event
            if not self._closed:
                await self._ready.wait()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fans published events out to subscribers; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._closed = False

    def publish(self, event: Event) -> Event:
        """Stamps `event` with the next sequence number and offers it to every
        subscriber; never blocks. Returns the stamped event. A no-op after close."""
        with self._lock:
            if self._closed:
                return event
            event = replace(event, seq=next(self._seq))
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.offer(event)
        return event

    def emit(self, kind: str, request_id: str = "", instance_id: str = "",
             destination_id: str = "", **detail: object) -> Event:
        """`publish(Event(...))` with `detail` values turned into strings."""
        return self.publish(Event(kind, request_id, instance_id, destination_id,
                                  {k: str(v) for k, v in detail.items()}))

    def subscribe(self, kinds: Iterable[str] | None = None,
                  maxsize: int = DEFAULT_QUEUE_SIZE) -> Subscription:
        """A subscription to events of `kinds` (all when None or empty), made
        inside the running loop that will consume it. After close, the
        subscription ends at once."""
        sub = Subscription(self, maxsize, frozenset(kinds) if kinds else None)
        with self._lock:
            if not self._closed:
                self._subscribers.add(sub)
                return sub
        sub.close()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def num_subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close(self) -> None:
        """Ends every subscription; later publishes go nowhere."""
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.close()
