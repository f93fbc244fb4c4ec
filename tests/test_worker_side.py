"""The worker half's tables without an engine: holds, pending releases and
what a refused pull says."""

from __future__ import annotations

import pytest

from llumigrate.engine.meta import HeldRequest, SchedulerMeta
from llumigrate.engine.worker_side import WorkerSide
from llumigrate.errors import TransferRefused
from llumigrate.transfer import PullRequest


def _worker_running(key: str = "k#0", req_id: str = "k#0-abc", **extra) -> WorkerSide:
    w = WorkerSide(block_size=4, extra=extra)
    w.bind(SchedulerMeta(keys={req_id: key}, block_updates=[(req_id, [3, 4, 5], False)]))
    return w


def _hold(w: WorkerSide, key: str = "k#0", req_id: str = "k#0-abc") -> None:
    w.bind(SchedulerMeta(held=[HeldRequest(req_id, key, [1, 2, 3, 4, 5, 6, 7, 8, 9], 5, 9, [3, 4, 5])]))


def test_release_that_beats_the_hold_frees_it_when_it_arrives():
    w = _worker_running()
    assert w.track("k#0") is False       # the scheduler half has not seen it yet
    assert w.release("k#0") is False      # kept pending
    _hold(w)
    sending, _, _ = w.get_finished({"k#0-abc"})
    assert sending == {"k#0-abc"} and w.sealed("k#0") is None


def test_release_from_a_cancelled_migration_does_not_free_a_later_hold():
    w = _worker_running()
    w.track("k#0")
    w.release("k#0")                      # the first migration was cancelled
    w.untrack("k#0")
    w.track("k#0")                        # a second one tracks the same hop
    _hold(w)
    sending, _, _ = w.get_finished({"k#0-abc"})
    assert sending == set()
    sealed = w.sealed("k#0")
    assert sealed is not None and sealed["num_blocks"] == 3


def test_pulls_are_served_from_running_and_held_requests_and_refused_with_a_reason():
    w = _worker_running()
    assert w._provide(PullRequest("k#0", 1, 2)).block_ids == [4, 5]
    with pytest.raises(TransferRefused, match="never seen"):
        w._provide(PullRequest("other#0", 0, 1))
    with pytest.raises(TransferRefused, match="out of range"):
        w._provide(PullRequest("k#0", 2, 2))
    w.track("k#0")
    _hold(w)
    w.get_finished({"k#0-abc"})           # finished on the engine, but held
    assert w._provide(PullRequest("k#0", 0, 3)).block_ids == [3, 4, 5]
    assert w.release("k#0") is True
    with pytest.raises(TransferRefused, match="it left: released"):
        w._provide(PullRequest("k#0", 0, 1))


def test_a_request_readmitted_after_preemption_is_not_loaded_again():
    """vLLM asks the connector again when it re-admits a preempted request.
    Its final load already released the source's hold: claiming the tokens
    again would pull from nothing and fail the request (seen in
    bench_serving under preemption pressure). It recomputes instead."""
    from types import SimpleNamespace

    from llumigrate.engine.params import LoadSpec, RequestTag
    from llumigrate.engine.scheduler_side import SchedulerSide

    side = SchedulerSide(block_size=4, extra={"sync_load_max_blocks": 0})
    tag = RequestTag("r#1", LoadSpec("127.0.0.1", 1, "r#0", 16, final=True))
    req = SimpleNamespace(request_id="r#1-x", kv_transfer_params=tag.to_params(), num_tokens=17)
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 0) == (16, True)
    side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: [[7, 8, 9, 10, 11]]), 16)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set())
    meta = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached))
    assert [job.dest_block_ids for job in meta.loads] == [[7, 8, 9, 10]]
    # Preempted after the load, then re-admitted with nothing computed:
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)


class _SlowClient:
    """A KV client whose pulls take until `go` is set."""

    def __init__(self) -> None:
        import threading
        self.go = threading.Event()
        self.pulls = 0

    def pull(self, address, req, dest_block_ids) -> bytes:
        self.go.wait(30)
        self.pulls += 1
        return b""


def _loading(idle_wait_s: float):
    from llumigrate.engine.meta import LoadJob
    from llumigrate.engine.params import LoadSpec

    w = WorkerSide(block_size=4, extra={"idle_wait_s": idle_wait_s})
    client = w.loads.client = _SlowClient()
    w.bind(SchedulerMeta(loads=[LoadJob("d#1", LoadSpec("127.0.0.1", 1, "s#0", 8), 0, [1, 2])]))
    return w, client


def test_an_idle_step_waits_for_the_load_it_polls():
    """A step that computes nothing (vLLM only polls the connector) waits for
    a background load to end instead of returning at once; news ends the
    wait, and a busy step never waits."""
    import threading
    import time

    w, client = _loading(idle_wait_s=30.0)
    w.bind(SchedulerMeta(idle=False))
    assert w.get_finished(set()) == (set(), set(), set())    # busy step: no wait, load still running
    w.bind(SchedulerMeta(idle=True))
    threading.Timer(0.2, client.go.set).start()
    t0 = time.monotonic()
    assert w.get_finished(set()) == (set(), {"d#1"}, set())  # waited for it
    assert client.pulls == 1 and time.monotonic() - t0 < 10  # ended by the news, not the 30 s
    last = w.status()["last_load"]  # what the operator sees of the load: its size and time
    assert last["blocks"] == 2 and last["ok"] and not last["sync"] and 0.15 < last["seconds"] < 10
    t0 = time.monotonic()
    assert w.get_finished(set()) == (set(), set(), set())    # idle, nothing pending: no wait
    assert time.monotonic() - t0 < 10
    w.shutdown()


def test_an_idle_step_with_held_blocks_wakes_on_their_release():
    import threading

    w = _worker_running(idle_wait_s=30.0)
    w.track("k#0")
    _hold(w)
    w.bind(SchedulerMeta(idle=True))
    threading.Timer(0.2, w.release, ("k#0",)).start()
    sending, _, _ = w.get_finished({"k#0-abc"})
    assert sending == {"k#0-abc"}


def test_a_paced_load_does_not_hold_up_a_commit_load():
    """A long paced pre-copy pull runs on its own thread: a commit's load
    (never paced) queued after it finishes first."""
    import threading

    from llumigrate.engine.meta import LoadJob
    from llumigrate.engine.params import LoadSpec

    class PacedBlocks:
        def __init__(self) -> None:
            self.go = threading.Event()

        def pull(self, address, req, dest_block_ids) -> bytes:
            if req.max_bytes_per_s:
                self.go.wait(30)
            return b""

    w = WorkerSide(block_size=4, extra={"idle_wait_s": 30.0})
    client = w.loads.client = PacedBlocks()
    w.bind(SchedulerMeta(loads=[LoadJob("pre#1", LoadSpec("h", 1, "s#0", 8, rate_mib_s=512), 0, [1, 2]),
                                LoadJob("commit#1", LoadSpec("h", 1, "s#0", 8, final=True), 0, [3, 4])]))
    w.bind(SchedulerMeta(idle=True))
    assert w.get_finished(set()) == (set(), {"commit#1"}, set())
    client.go.set()
    assert w.get_finished(set()) == (set(), {"pre#1"}, set())
    w.shutdown()


class _FakeBatch:
    """What the restore hook wraps: vLLM's V1 `InputBatch.add_request`."""

    def __init__(self) -> None:
        self.added: list[tuple[str, list[int]]] = []

    def add_request(self, request) -> int:
        self.added.append((request.req_id, list(request.output_token_ids)))
        return len(self.added) - 1


def _req_state(req_id: str):
    from types import SimpleNamespace
    return SimpleNamespace(req_id=req_id, output_token_ids=[])


def test_restored_outputs_enter_the_input_batch_with_their_request():
    """Stashed before the runner updates its states, O is in the request
    state when vLLM's add_request copies it (token ids, penalties, logits
    processors); other requests pass untouched; a re-created batch is hooked
    again."""
    from types import SimpleNamespace
    w = WorkerSide(block_size=4, extra={})
    runner = SimpleNamespace(input_batch=_FakeBatch())
    w.model_runner = runner
    w.before_update(SchedulerMeta(restored_outputs={"a": [5, 6, 7]}))
    runner.input_batch.add_request(_req_state("b"))
    runner.input_batch.add_request(_req_state("a"))
    w.bind(SchedulerMeta())                       # every stashed request went in
    assert runner.input_batch.added == [("b", []), ("a", [5, 6, 7])]
    w.before_update(SchedulerMeta(restored_outputs={"a": [1]}))
    w.before_update(SchedulerMeta(restored_outputs={"a": [1]}))  # hooked once, not twice
    state = _req_state("a")
    runner.input_batch.add_request(state)
    assert state.output_token_ids == [1]
    runner.input_batch = _FakeBatch()             # the runner re-created its batch
    w.before_update(SchedulerMeta(restored_outputs={"c": [9]}))
    runner.input_batch.add_request(_req_state("c"))
    assert runner.input_batch.added == [("c", [9])]


def test_a_restored_request_that_missed_the_batch_is_an_invariant_failure():
    from types import SimpleNamespace
    w = WorkerSide(block_size=4, extra={})
    w.model_runner = SimpleNamespace(input_batch=_FakeBatch())
    w.before_update(SchedulerMeta(restored_outputs={"a": [5]}))
    with pytest.raises(AssertionError, match="missed the input batch"):
        w.bind(SchedulerMeta())


def test_restores_need_an_attached_v1_runner():
    from types import SimpleNamespace
    w = WorkerSide(block_size=4, extra={})
    w.before_update(SchedulerMeta())                               # nothing to restore: fine
    with pytest.raises(RuntimeError, match="before the llumigrate worker extension was attached"):
        w.before_update(SchedulerMeta(restored_outputs={"a": [5]}))
    w.model_runner = SimpleNamespace()                             # Model Runner V2: no batch
    with pytest.raises(RuntimeError, match="no V1 input batch"):
        w.before_update(SchedulerMeta(restored_outputs={"a": [5]}))
