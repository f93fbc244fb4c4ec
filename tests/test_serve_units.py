"""The serve layer's pure parts, over hand-built cluster state (no engine):
snapshots from controller state, policy changes, migration rounds."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from llumigrate.controller.instance import Instance
from factories import make_handle
from llumigrate.errors import ConfigError
from llumigrate.migration.protocol import MigrationConfig
from llumigrate.scheduler import SchedulerConfig
from llumigrate.serve.scheduler import GlobalScheduler
from llumigrate.serve.snapshots import cluster_snapshot


class FakeCluster:
    """What the serve layer reads of a `Cluster`, plus a recording `migrate`."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.requests: dict = {}
        self.migrated: list[tuple[str, str]] = []
        self.configs: list = []
        self.migration_config = MigrationConfig()

    def add(self, iid: str, free: int, num_blocks: int = 100, running: int = 0, waiting: int = 0,
            reported_at: float = 0.0) -> Instance:
        inst = Instance(iid, "127.0.0.1", 1, info={"block_size": 16})
        inst.load = {"num_blocks": num_blocks, "free_blocks": free, "num_running": running,
                     "num_waiting": waiting}
        inst.reported_at = reported_at
        self.instances[iid] = inst
        return inst

    def request(self, rid: str, iid: str, prompt: int, output: int, **sampling):
        h = make_handle(rid, list(range(prompt)), {"max_tokens": 1000, **sampling}, 0, iid)
        h.output_token_ids = list(range(output))
        h.arrival = h.queued_at = -1.0
        self.requests[rid] = h
        return h

    async def migrate(self, rid: str, dst: str, config=None):
        self.migrated.append((rid, dst))
        self.configs.append(config)
        raise ConfigError("not in this test")


class FakeObserver:
    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}


def test_snapshot_counts_fresh_dispatches_as_waiting_demand():
    c = FakeCluster()
    c.add("i0", free=90, running=1, reported_at=5.0)
    c.request("old", "i0", prompt=40, output=10)
    fresh = c.request("new", "i0", prompt=64, output=0)
    fresh.arrival = fresh.queued_at = 6.0  # after the last report: the engine has not counted it
    snap = cluster_snapshot(c, now=6.5)["i0"]
    assert snap.num_waiting == 1 and snap.waiting_demand_blocks == 4 and snap.head_waiting_blocks == 4
    by_id = {r.request_id: r for r in snap.requests}
    assert by_id["old"].status == "running" and by_id["old"].migratable
    # Queued: only defrag may move it (re-dispatch), and it is the head.
    assert by_id["new"].status == "waiting" and snap.head_waiting_id == "new"


def test_snapshot_carries_each_running_request_s_recent_decode_rate():
    """How fast a request generates where it runs now: tokens over the time
    spanned by its last deltas (16 by default), not its lifetime average,
    which a stall or an earlier hop would skew. None until measurable."""
    c = FakeCluster()
    c.add("i0", free=90, running=2, reported_at=5.0)
    slow_then_fast = c.request("r", "i0", prompt=40, output=0)
    for t, n in [(0.0, 1), (10.0, 1)] + [(10.0 + 0.01 * k, 1) for k in range(1, 16)]:
        slow_then_fast.token_times.append(t)
        slow_then_fast.token_counts.append(n)
    slow_then_fast.output_token_ids = list(range(17))
    just_started = c.request("s", "i0", prompt=40, output=1)
    just_started.token_times, just_started.token_counts = [4.0], [1]
    by_id = {r.request_id: r for r in cluster_snapshot(c, now=6.0)["i0"].requests}
    assert by_id["r"].decode_tokens_per_s == pytest.approx(15 / 0.15)  # the last 16 deltas
    assert slow_then_fast.decode_rate(window=17) == pytest.approx(16 / 10.15)
    assert by_id["s"].decode_tokens_per_s is None


def test_snapshot_puts_preempted_requests_at_the_queue_head():
    """vLLM re-queues a preempted request at the head, holding no blocks: the
    engine lists it (newest first) and the snapshot counts it as waiting
    demand for its whole context, ahead of the requests not started yet."""
    c = FakeCluster()
    c.add("i0", free=20, running=1, waiting=3, reported_at=5.0)
    c.instances["i0"].load["preempted"] = ["p2", "p1", "gone"]
    c.request("run", "i0", prompt=40, output=10)
    c.request("p1", "i0", prompt=64, output=16)     # 5 blocks of context
    c.request("p2", "i0", prompt=32, output=16)     # 3 blocks
    c.request("q", "i0", prompt=48, output=0)       # 3 blocks, counted by the engine
    snap = cluster_snapshot(c, now=6.0)["i0"]
    by_id = {r.request_id: r for r in snap.requests}
    assert by_id["run"].status == "running"
    assert [by_id[k].status for k in ("p1", "p2", "q")] == ["waiting"] * 3
    assert snap.head_waiting_id == "p2" and snap.head_waiting_blocks == 3
    assert snap.waiting_demand_blocks == 5 + 3 + 3 and snap.num_waiting == 3


def test_snapshot_queues_a_redispatched_request_at_the_tail():
    """A request re-dispatched to i0 arrived at the cluster before i0's own
    queue did, but joined i0's queue last: it is listed last, and it counts
    as sent after the report when it was."""
    c = FakeCluster()
    c.add("i0", free=2, running=1, waiting=2, reported_at=5.0)
    c.request("run", "i0", prompt=40, output=10)
    for rid, queued_at in (("a", 1.0), ("moved", 6.0), ("b", 2.0)):
        c.request(rid, "i0", prompt=48, output=0).queued_at = queued_at
    c.requests["moved"].arrival = 0.5
    snap = cluster_snapshot(c, now=6.5)["i0"]
    assert [r.request_id for r in snap.queue] == ["a", "b", "moved"]
    assert snap.head_waiting_id == "a" and snap.num_waiting == 3 and snap.waiting_demand_blocks == 9


def test_blocks_of_a_migration_in_flight_are_not_free_at_its_destination():
    """From the start of a migration until it commits, its destination's
    engine cannot count the blocks the request will take there: the
    snapshot does, so that dispatch and other moves do not count on them."""
    c = FakeCluster()
    c.add("i0", free=25)
    c.add("i1", free=30)
    m = c.request("m", "i0", prompt=100, output=12)           # 112 tokens: 7 blocks
    big = make_handle("big", list(range(640)), {}, 0, "i0")   # 40 blocks: more than is free
    c.instances["i1"].incoming.update(m=m, big=big)
    assert cluster_snapshot(c, now=1.0)["i1"].free_blocks == 0
    del c.instances["i1"].incoming["big"]
    snap = cluster_snapshot(c, now=1.0)
    assert snap["i1"].free_blocks == 23 and snap["i0"].free_blocks == 25
    # i1 reports more free blocks, but 7 of them are m's: new work goes to i0.
    async def choose() -> str:
        return GlobalScheduler(c, SchedulerConfig(), FakeObserver()).choose()
    assert asyncio.run(choose()) == "i0"
    c.requests["m"].instance_id = "i1"                          # committed: listed at i1 now
    assert cluster_snapshot(c, now=1.0)["i1"].free_blocks == 30


def test_snapshot_marks_unmigratable_and_draining():
    c = FakeCluster()
    c.add("i0", free=50).draining = True
    c.request("pen", "i0", prompt=10, output=5, presence_penalty=0.5)   # carried exactly: movable
    c.request("stream", "i0", prompt=10, output=5).core.resumable = True  # streaming input: not
    snap = cluster_snapshot(c, now=1.0)["i0"]
    by_id = {r.request_id: r for r in snap.requests}
    assert snap.draining and by_id["pen"].migratable and not by_id["stream"].migratable


def test_set_policy_is_all_or_nothing():
    async def go():
        s = GlobalScheduler(FakeCluster(), SchedulerConfig(), FakeObserver())
        with pytest.raises(ConfigError, match="unknown thresholds"):
            s.set_policy(thresholds={"warp_speed": 9})
        with pytest.raises(ConfigError, match="integer"):
            s.set_policy(dispatch="round-robin", thresholds={"max_migrations_out": 1.5})
        with pytest.raises(ConfigError, match="dispatch_policy"):
            s.set_policy(dispatch="fastest")
        assert s.config == SchedulerConfig()
        cfg = s.set_policy(dispatch="round-robin", migration=["drain"],
                           thresholds={"max_migrations_out": 2, "cooldown_s": 1})
        return cfg, s.dispatcher
    cfg, dispatcher = asyncio.run(go())
    assert cfg.dispatch_policy == "round-robin" and cfg.migration_policies == {"drain"}
    assert cfg.max_migrations_out == 2 and type(dispatcher).__name__ == "RoundRobinDispatcher"


def test_round_plans_drain_and_a_refused_plan_leaves_the_request_alone():
    async def go():
        c = FakeCluster()
        c.add("i0", free=60, running=1).draining = True
        c.add("i1", free=100)
        c.request("r", "i0", prompt=64, output=20)
        obs = FakeObserver()
        s = GlobalScheduler(c, SchedulerConfig(migration_policies=()), obs)
        assert s.step() == []                       # no policy enabled
        plans = s.step(only=("drain",))             # what a leaving instance gets
        await asyncio.sleep(0.05)
        return plans, c.migrated, obs.reasons, s.history
    plans, migrated, reasons, history = asyncio.run(go())
    assert [(p.request_id, p.source, p.destination, p.reason) for p in plans] == [("r", "i0", "i1", "drain")]
    assert migrated == [("r", "i1")]
    assert reasons == {}                            # refused: nothing recorded
    assert not history.cooling("r", 0.0, 10.0)


def test_a_redispatched_queued_request_moves_without_precopy():
    """A defrag plan for a queued (here preempted) request runs as a
    recompute migration: it has no KV on its source to pre-copy."""
    async def go():
        c = FakeCluster()
        c.add("i0", free=2, running=1, waiting=1)
        c.add("i1", free=100)
        c.instances["i0"].load["preempted"] = ["p"]
        c.request("run", "i0", prompt=16 * 20, output=10)
        c.request("p", "i0", prompt=16 * 8, output=20)
        s = GlobalScheduler(c, SchedulerConfig(migration_policies=("defrag",)), FakeObserver())
        plans = s.step()
        await asyncio.sleep(0.05)
        return plans, c.migrated, c.configs
    plans, migrated, configs = asyncio.run(go())
    assert [(p.request_id, p.destination, p.reason, p.waiting) for p in plans] == [("p", "i1", "defrag", True)]
    assert migrated == [("p", "i1")] and configs[0].recompute


def test_dispatch_prefers_the_freer_instance_and_spreads_ties():
    async def go():
        c = FakeCluster()
        c.add("i0", free=10, running=2)
        c.add("i1", free=90, running=2)
        s = GlobalScheduler(c, SchedulerConfig(), FakeObserver())
        first = s.choose()
        c.instances["i0"].load["free_blocks"] = 90
        ties = [s.choose() for _ in range(4)]
        return first, ties
    first, ties = asyncio.run(go())
    assert first == "i1"
    assert set(ties) == {"i0", "i1"}


def test_engine_spin_reaches_the_agents_command_line():
    from llumigrate.cli import instance, serve
    from llumigrate.controller.instance import spin_args
    args = serve.parse(["--num-instances", "1", "--engine-spin-ms", "5"])
    assert serve.build_config(args).engine_spin_ms == 5.0
    assert serve.build_config(serve.parse([])).engine_spin_ms is None
    assert instance.parse(["--engine-spin-ms", "0"]).engine_spin_ms == 0.0
    assert spin_args(None) == [] and spin_args(0) == ["--engine-spin-ms", "0.0"]


def test_retain_finished_reaches_the_cluster(tmp_path):
    from llumigrate.cli import serve
    from llumigrate.controller.cluster import RETAIN_FINISHED
    from llumigrate.serve.service import Service
    assert serve.build_config(serve.parse([])).retain_finished == RETAIN_FINISHED
    config = serve.build_config(serve.parse(["--num-instances", "0", "--retain-finished", "7"]))
    assert config.retain_finished == 7
    service = Service(replace(config, port=0, control_address="127.0.0.1:0", run_dir=str(tmp_path)))
    assert service.cluster.retain_finished == 7
    with pytest.raises(ConfigError, match="retain_finished"):
        replace(config, retain_finished=-1)


def test_freezing_the_startup_heap_hides_it_from_collections():
    import gc

    from llumigrate.gcheap import freeze_startup_heap
    try:
        frozen = freeze_startup_heap()
        # This process's imports. (Other threads here, e.g. the shared
        # service's loop, may free a few frozen objects meanwhile.)
        assert frozen > 10_000 and frozen - 1_000 <= gc.get_freeze_count() <= frozen
        cycles = [[] for _ in range(1000)]                 # allocated after: still collected as usual
        for c in cycles:
            c.append(c)
        del cycles, c
        # (frozen objects freed by reference counting leave the frozen count)
        assert gc.collect() >= 1000 and gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("taken", ["http", "control"])
def test_an_address_in_use_fails_before_any_engine_starts(tmp_path, taken):
    """Both listening addresses are taken before the engines start: a port
    in use fails at once with a clear error (not after the engines' 10-25 s
    start), no engine's own socket can take a chosen port meanwhile, and
    `stop` lets go of the other address."""
    import socket

    from llumigrate.cli import serve
    from llumigrate.serve.service import Service

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    busy = blocker.getsockname()[1]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    other = free.getsockname()[1]
    free.close()
    http, control = (busy, other) if taken == "http" else (other, busy)
    config = serve.build_config(serve.parse(["--num-instances", "0"]))
    service = Service(replace(config, port=http, control_address=f"127.0.0.1:{control}",
                              run_dir=str(tmp_path)))
    started: list[bool] = []

    async def engines() -> None:
        started.append(True)
    service.cluster.start = engines  # type: ignore[method-assign]

    async def run() -> None:
        try:
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{busy}"):
                await service.start()
        finally:
            await service.stop()
    try:
        asyncio.run(run())
        assert started == []
        again = socket.socket()       # the other address was let go
        again.bind(("127.0.0.1", other))
        again.close()
    finally:
        blocker.close()


def test_vllm_serve_arguments_reach_the_server_and_the_instances_as_in_vllm():
    """Frontend arguments go to vLLM's server (its parsed arguments), engine
    arguments to each instance; the API key and the address are the
    server's alone (not on any instance's command line)."""
    from llumigrate.cli import serve
    args = serve.parse(["--num-instances", "1", "--api-key", "k3y", "--served-model-name", "a", "b",
                        "--chat-template", "{{ messages }}", "--max-logprobs", "4", "--port", "9",
                        "--dtype", "float32", "--tool-call-parser", "hermes", "--enable-auto-tool-choice"])
    config = serve.build_config(args)
    ns = config.vllm_args()
    assert ns.api_key == ["k3y"] and ns.served_model_name == ["a", "b"] and ns.port == 9
    assert ns.chat_template == "{{ messages }}" and ns.max_logprobs == 4 and ns.tool_call_parser == "hermes"
    assert ns.host == "127.0.0.1"                      # llumigrate's default: loopback
    assert "k3y" not in config.engine_args and "--port" not in config.engine_args
    assert {"--dtype", "--max-logprobs", "--chat-template"} <= set(config.engine_args)
    with pytest.raises(ConfigError, match="api-key"):
        replace(config, host="0.0.0.0", api_key=None)
    assert replace(config, host="0.0.0.0").api_key == ("k3y",)
