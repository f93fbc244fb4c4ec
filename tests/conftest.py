"""Shared fixtures. Engines take 20-30 s to start on 2 cores, so the real
two-instance cluster is session-scoped and shared by every engine test."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

ENGINE_ARGS = ["--dtype", "float32", "--enforce-eager", "--block-size", "32",
               "--kv-cache-memory-bytes", str(160 << 20), "--max-model-len", "4096",
               "--max-num-seqs", "16"]
# `vllm serve` frontend flags of the shared service (and of vLLM's own server
# in tests/test_openai_battery.py): tool calling with the hermes parser over a
# hermes-style chat template, which renders a conversation without tools as
# the tiny tokenizer's own template does.
FRONTEND_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--chat-template", str(Path(__file__).parent / "data" / "hermes_tools.jinja")]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engine: starts real vLLM engines (slow)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


class LoopThread:
    """An asyncio loop on a thread, so sync tests can drive the async Cluster."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Engine tests use a wider variant of the built-in model: it decodes slowly
    enough (tens of ms a step on 2 cores) that a test can migrate mid-stream."""
    from llumigrate.model.tiny import TinyModelConfig, ensure_tiny_model
    return str(ensure_tiny_model(config=TinyModelConfig(num_layers=4, hidden_size=512,
                                                        num_heads=8, num_kv_heads=8)))


@pytest.fixture(scope="session")
def loop() -> LoopThread:
    lt = LoopThread()
    yield lt
    lt.close()


@contextlib.contextmanager
def running_service(loop: LoopThread, model: str, engine_args, run_dir: str, interval_s: float = 0.2,
                    **overrides: Any):
    """`llumigrate serve` in-process: 2 real engines, the OpenAI endpoint and
    the gRPC control API on free loopback ports, migration policies off."""
    from llumigrate.scheduler import SchedulerConfig
    from llumigrate.serve.service import ServeConfig, Service
    fields: dict[str, Any] = dict(num_instances=2, port=0, control_address="127.0.0.1:0",
                                  served_model_name="tiny", scheduler=SchedulerConfig(migration_policies=()),
                                  interval_s=interval_s, run_dir=run_dir, log_level="warning")
    config = ServeConfig(model=model, engine_args=tuple(engine_args), **{**fields, **overrides})
    svc = Service(config)
    loop.run(svc.start(), timeout=600)
    try:
        yield svc
    finally:
        loop.run(svc.stop(), timeout=120)


@pytest.fixture(scope="session")
def service(tiny_model: str, loop: LoopThread, tmp_path_factory: pytest.TempPathFactory):
    """The shared service (see `running_service`). Its migration policies
    start disabled, so tests that migrate by hand are undisturbed; a test
    that enables one restores the policy after."""
    with running_service(loop, tiny_model, [*ENGINE_ARGS, *FRONTEND_ARGS],
                         str(tmp_path_factory.mktemp("service"))) as svc:
        yield svc


@pytest.fixture(scope="session")
def cluster(service):
    """The service's `Cluster`: engine tests drive it directly."""
    return service.cluster
