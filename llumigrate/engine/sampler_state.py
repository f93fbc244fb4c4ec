"""Sampler generator states of tracked seeded requests (worker side).

A seeded request continues exactly on its destination only with its sampler
generator's state at the stop. The worker may sample one token more than the
scheduler keeps at the abort, so states are snapshotted before each forward,
keyed by the number of tokens sampled so far, and the one matching the
sealed token count is picked.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from llumigrate.engine.vllm_compat import request_sampler_state

logger = logging.getLogger(__name__)

MAX_SNAPSHOTS = 4


class SamplerStates:
    def __init__(self) -> None:
        self._snapshots: dict[str, OrderedDict[int, bytes]] = {}  # key -> samples -> state
        self._refs: dict[str, Any] = {}                           # key -> live request state

    def snapshot(self, model_runner: Any, key: str, req_id: str) -> None:
        """Record `req_id`'s generator state now (before this step's forward)."""
        state = request_sampler_state(model_runner, req_id)
        if state is None or state.generator is None:
            return
        self._refs[key] = state
        snaps = self._snapshots.setdefault(key, OrderedDict())
        snaps[len(state.output_token_ids)] = bytes(state.generator.get_state().numpy())
        while len(snaps) > MAX_SNAPSHOTS:
            snaps.popitem(last=False)

    def has(self, key: str) -> bool:
        return key in self._snapshots

    def state_after(self, key: str, num_sampled: int) -> bytes | None:
        """The generator state of `key` once it had sampled `num_sampled`
        tokens; None for an unseeded request."""
        ref = self._refs.get(key)
        if ref is None or ref.generator is None:
            return None
        if len(ref.output_token_ids) == num_sampled:
            return bytes(ref.generator.get_state().numpy())
        # The worker sampled one token the scheduler dropped at the abort:
        # the snapshot taken before that step's forward has the right state.
        state = self._snapshots.get(key, {}).get(num_sampled)
        if state is None:
            logger.error("no sampler state of %s after %d samples", key, num_sampled)
        return state

    def forget(self, key: str) -> None:
        self._snapshots.pop(key, None)
        self._refs.pop(key, None)


def install_sampler_state(model_runner: Any, req_id: str, state: bytes) -> None:
    """Give a resumed request the generator state it had on its source."""
    if model_runner is None:
        raise RuntimeError("llumigrate worker extension not attached; cannot resume seeded request")
    req_state = request_sampler_state(model_runner, req_id)
    if req_state is None or req_state.generator is None:
        logger.error("request %s has no sampler generator to restore", req_id)
        return
    req_state.generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
