"""Pre-copy pacing: the pure `Pacer`, and the rate's validation wherever it
enters (MigrationConfig, the LoadSpec on the wire, PullRequest)."""

from __future__ import annotations

import pytest

from llumigrate.engine.params import LoadSpec
from llumigrate.errors import ConfigError
from llumigrate.migration.protocol import MIN_PRECOPY_RATE_MIB_S, MigrationConfig
from llumigrate.transfer import PullRequest
from llumigrate.transfer.pacing import MIN_RATE_BYTES_PER_S, Pacer, pieces


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_pacer_holds_the_average_rate():
    clock = FakeClock()
    p = Pacer(1000, burst_s=1.0, clock=clock, sleep=clock.sleep)
    p.spent(500)                 # copied instantly: wait until t = 0.5
    assert clock.sleeps == [pytest.approx(0.5)]
    clock.now += 0.8             # a slow piece: 500 more bytes due at 1.0, already past
    p.spent(500)
    assert len(clock.sleeps) == 1
    p.spent(1000)                # due at 2.0, now 1.3
    assert clock.sleeps[-1] == pytest.approx(0.7)
    assert clock.now == pytest.approx(2.0) and p.slept_s == pytest.approx(1.2)


def test_catching_up_is_capped_at_the_burst():
    clock = FakeClock()
    p = Pacer(1000, burst_s=0.1, clock=clock, sleep=clock.sleep)
    p.spent(100)                 # due at 0.1
    assert clock.now == pytest.approx(0.1)
    clock.now += 2.0             # stalled 2 s: only 0.1 s (100 bytes) of it is credit
    p.spent(100)                 # within the credit: no sleep
    assert len(clock.sleeps) == 1
    p.spent(300)                 # the rest runs at the rate again: 300 bytes, 0.3 s
    assert clock.sleeps[-1] == pytest.approx(0.3)
    # Without a cap the 2 s stall would have let 2000 bytes through unpaced.
    uncapped = FakeClock()
    q = Pacer(1000, burst_s=float("inf"), clock=uncapped, sleep=uncapped.sleep)
    q.spent(100)
    uncapped.now += 2.0
    q.spent(100)
    q.spent(300)
    assert len(uncapped.sleeps) == 1
    with pytest.raises(ValueError):
        Pacer(1000, burst_s=-1)


def test_unlimited_pacer_never_sleeps():
    clock = FakeClock()
    p = Pacer(0, clock=clock, sleep=clock.sleep)
    for _ in range(10):
        p.spent(1 << 30)
    assert not p.limited and clock.sleeps == []
    with pytest.raises(ValueError):
        Pacer(-1)


def test_pieces_cover_the_range():
    assert pieces(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert pieces(3, 0) == [(0, 1), (1, 2), (2, 3)]
    assert pieces(0, 4) == []


def test_rate_validated_where_it_enters():
    assert MIN_PRECOPY_RATE_MIB_S << 20 == MIN_RATE_BYTES_PER_S
    assert MigrationConfig().precopy_rate_mib_s >= MIN_PRECOPY_RATE_MIB_S
    MigrationConfig(precopy_rate_mib_s=0)
    with pytest.raises(ConfigError, match="precopy_rate_mib_s"):
        MigrationConfig(precopy_rate_mib_s=MIN_PRECOPY_RATE_MIB_S - 1)
    with pytest.raises(ConfigError):
        MigrationConfig(precopy_rate_mib_s=-5)
    PullRequest("k", 0, 1, max_bytes_per_s=MIN_RATE_BYTES_PER_S)
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        PullRequest("k", 0, 1, max_bytes_per_s=1000)


def test_load_spec_carries_the_rate():
    spec = LoadSpec("h", 1, "r#1", 256, rate_mib_s=512.0)
    assert LoadSpec.from_wire(spec.to_wire()) == spec
    old = {"host": "h", "port": 1, "src_key": "r#1", "num_tokens": 256}  # a peer that sends none
    assert LoadSpec.from_wire(old).rate_mib_s == 0.0
    with pytest.raises(ValueError, match="rate_mib_s"):
        LoadSpec.from_wire({**old, "rate_mib_s": 3})
