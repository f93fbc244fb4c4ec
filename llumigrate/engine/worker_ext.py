"""Worker extension mixed into vLLM's worker class (`worker_extension_cls`).

The agent calls these with `AsyncLLM.collective_rpc("llumigrate_*", ...)`.
They run on the worker's engine thread between steps, so each one only reads
or flips bookkeeping; bulk copies never happen here.
"""

from __future__ import annotations

from typing import Any

from llumigrate.engine.vllm_compat import get_kv_transfer_group, has_kv_transfer_group


def _side() -> Any:
    if not has_kv_transfer_group():
        raise RuntimeError("the llumigrate KV connector is not configured on this engine")
    side = get_kv_transfer_group()._worker
    if side is None:
        raise RuntimeError("llumigrate connector has no worker side in this process")
    return side


class LlumigrateWorkerExtension:
    def llumigrate_attach(self) -> dict:
        """Give the connector this worker's model runner (sampler states,
        restored requests); returns KV server info. Call before any request
        with restored output tokens or a generator state arrives."""
        return _side().attach(self.model_runner)  # type: ignore[attr-defined]

    def llumigrate_track(self, key: str) -> bool:
        return _side().track(key)

    def llumigrate_untrack(self, key: str) -> None:
        _side().untrack(key)

    def llumigrate_sealed(self, key: str) -> dict | None:
        return _side().sealed(key)

    def llumigrate_release(self, key: str) -> bool:
        return _side().release(key)

    def llumigrate_status(self) -> dict:
        return _side().status()

    def llumigrate_fault(self, kind: str, seconds: float = 0.0) -> bool:
        """Stress testing only: arm a one-shot KV transfer fault (see WorkerSide)."""
        return _side().inject_fault(kind, seconds)
