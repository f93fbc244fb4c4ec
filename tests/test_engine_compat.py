"""The engine adapter's settings: the bounded message-queue busy-wait (on
vLLM's real shm reader condition) and how engine arguments carry it."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from llumigrate.engine.runtime import CPU_ENGINE_SPIN_MS, parse_engine_args
from llumigrate.engine.vllm_compat import bound_mq_spin
from llumigrate.errors import ConfigError


@pytest.fixture()
def spin_condition():
    from vllm.distributed.device_communicators import shm_broadcast as sb
    saved = (sb.SpinCondition.wait, sb.SHM_READER_RECHECK_INTERVAL_MS)
    ctx = zmq.Context()
    addr = f"inproc://llumigrate-test-{time.monotonic_ns()}"
    writer = sb.SpinCondition(is_reader=False, context=ctx, notify_address=addr)
    reader = sb.SpinCondition(is_reader=True, context=ctx, notify_address=addr)
    yield sb, reader, writer
    sb.SpinCondition.wait, sb.SHM_READER_RECHECK_INTERVAL_MS = saved
    ctx.destroy(linger=0)


def test_vllm_reader_spins_for_a_second_after_a_read(spin_condition):
    """The behaviour being bounded: right after a read, vLLM's wait returns
    at once (the caller loops on it: a busy-wait) instead of sleeping."""
    _, reader, _ = spin_condition
    reader.record_read()
    t = time.monotonic()
    reader.wait(timeout_ms=300)
    assert time.monotonic() - t < 0.1


def test_bounded_reader_sleeps_until_notified(spin_condition):
    sb, reader, writer = spin_condition
    assert bound_mq_spin(0.002, recheck_s=0.02)
    assert sb.SHM_READER_RECHECK_INTERVAL_MS == 20
    reader.record_read()
    time.sleep(0.01)                     # past the 2 ms spin
    t = time.monotonic()
    reader.wait(timeout_ms=300)          # nothing written: sleeps to its timeout
    assert time.monotonic() - t >= 0.25
    # A notification wakes it well before the timeout.
    threading.Timer(0.05, writer.notify).start()
    t = time.monotonic()
    reader.wait(timeout_ms=3000)
    assert time.monotonic() - t < 2.0
    # Applying it again (both connector roles in one process) wraps once.
    assert bound_mq_spin(0.002)
    assert sb.SpinCondition.wait.__name__ == "wait"
    assert sb.SpinCondition._llumigrate_original_wait is not sb.SpinCondition.wait


def test_engine_args_carry_the_spin_bound():
    extra = lambda a: a.kv_transfer_config["kv_connector_extra_config"]  # noqa: E731
    # This host has no accelerator: the CPU default applies.
    assert extra(parse_engine_args("m", []))["engine_spin_s"] == CPU_ENGINE_SPIN_MS / 1000
    assert extra(parse_engine_args("m", [], engine_spin_ms=50))["engine_spin_s"] == 0.05
    with pytest.raises(ConfigError, match="spin"):
        parse_engine_args("m", [], engine_spin_ms=-1)
