"""Failover: continue a request of a lost instance on another one by token
replay (its KV cache died with the instance, so it is recomputed).

- Greedy and unseeded requests continue after the tokens streamed so far:
  the same prompt, those tokens restored as outputs (one prefill recomputes
  their KV), so penalties, grammars and stop checks continue exactly.
- Seeded requests restart from the original prompt with the same seed: their
  sampler state died too, and replaying every sample is the only way to reach
  it. The tokens already streamed come out again; `RequestHandle.append`
  checks them against what the client got and does not re-stream them. A
  replay that produces different tokens fails the request with a clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from llumigrate.controller.hops import add_hop
from llumigrate.controller.instance import Instance
from llumigrate.controller.request import RequestHandle
from llumigrate.errors import InstanceLost

logger = logging.getLogger(__name__)


def is_seeded(sampling: Any) -> bool:
    return sampling is not None and sampling.seed is not None and float(sampling.temperature) > 0


async def replay(h: RequestHandle, dst: Instance,
                 set_hop: Callable[[RequestHandle, Instance, int], None]) -> None:
    """Start `h`'s next hop on `dst` by replay. Raises what `dst.call` raises."""
    outputs: list[int] = []
    skip: list[int] = []
    if is_seeded(h.sampling):
        skip = list(h.output_token_ids)   # re-sampled, checked, not sent again
    else:
        outputs = list(h.output_token_ids)
        if h.max_tokens is not None and len(outputs) >= h.max_tokens:
            h.finish("length")
            return
    h.num_failovers += 1
    set_hop(h, dst, h.hop + 1)
    await add_hop(dst, h, h.engine_rid, outputs=outputs, skip=skip)


class FailoverSteps:
    """How `Cluster` continues the requests of a lost instance (mixed into it)."""

    failover: bool
    # Replays one request may get (None: no limit). A request whose instances
    # keep dying under it may be what kills them (a poison request): replayed
    # without end it would take down every instance in turn.
    max_failovers: int | None
    instances: dict[str, Instance]

    def _pick(self, exclude: str | set[str] | None = None) -> Instance:
        raise NotImplementedError

    def _set_hop(self, h: RequestHandle, inst: Instance, hop: int) -> None:
        raise NotImplementedError

    def _notify(self, method: str, *args: Any) -> None:
        raise NotImplementedError

    def _spawn(self, coro: Any) -> None:
        raise NotImplementedError

    def _replays_left(self, h: RequestHandle) -> bool:
        return self.max_failovers is None or h.num_failovers < self.max_failovers

    def _lost_request(self, h: RequestHandle, reason: str) -> None:
        if not self.failover:
            h.finish("error", error=reason)
            return
        if not self._replays_left(h):
            logger.error("%s: %s; not replayed again after %d replay(s)", h.request_id, reason, h.num_failovers)
            h.finish("error", error=f"{reason}; not replayed again: the instance died under it after "
                                    f"{h.num_failovers} replay(s) (at most {self.max_failovers})")
            return

        async def go() -> None:
            if not await self._failover(h):
                h.finish("error", error=f"{reason}; no instance to fail over to")
        self._spawn(go())

    async def _failover(self, h: RequestHandle) -> bool:
        """Replay `h` on another live instance, trying each in turn (one may
        be going down too), and last on its own instance if that is still up
        (a migration rollback whose resumed hop found its hold gone, with
        every other instance down); False if none took it."""
        if not self._replays_left(h):
            logger.error("%s: not replayed again after %d replay(s)", h.request_id, h.num_failovers)
            return False
        source, tried, own_tried = h.instance_id, {h.instance_id}, False
        while True:
            try:
                dst = self._pick(exclude=tried)
            except InstanceLost:
                own = self.instances.get(source)
                if own_tried or own is None or not own.up:
                    return False
                dst, own_tried = own, True
            tried.add(dst.instance_id)
            self._notify("on_failover", h, source, dst.instance_id)
            try:
                await replay(h, dst, self._set_hop)
                return True
            except Exception as e:
                logger.error("failover of %s to %s failed: %s", h.request_id, dst.instance_id, e)
                try:  # in case it started there after all
                    await dst.call("abort", rpc_timeout=2, rid=h.engine_rid)
                except Exception:
                    pass
