"""The scheduler half's stop at a step boundary, without an engine: `cap`
makes a running tracked request end after its next token, and only that end
(not a real one at the same step) is held as a stop. Also the command channel
(real UNIX sockets)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from llumigrate.engine.commands import CommandClient, CommandServer
from llumigrate.engine.meta import WorkerMeta
from llumigrate.engine.params import RequestTag
from llumigrate.engine.scheduler_side import SchedulerSide
from llumigrate.engine.vllm_compat import RequestStatus

KEY = "r#0"


class FakeRequest:
    """What the scheduler half reads of a vLLM request."""

    def __init__(self, max_tokens: int = 50, num_output: int = 10, num_prompt: int = 20) -> None:
        self.request_id = KEY + "-abc"
        self.kv_transfer_params = RequestTag(KEY).to_params()
        self.status = RequestStatus.RUNNING
        self.max_tokens = max_tokens
        self.num_prompt_tokens = num_prompt
        self.output = list(range(num_output))
        self.stop_reason = None
        self.sampling_params = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output)

    @property
    def num_computed_tokens(self) -> int:
        return self.num_tokens - 1

    @property
    def all_token_ids(self) -> list[int]:
        return list(range(100, 100 + self.num_prompt_tokens)) + self.output

    def get_finished_reason(self):
        return "length" if self.status == RequestStatus.FINISHED_LENGTH_CAPPED else None

    def step(self) -> None:
        """One engine step: a token, then vLLM's length check."""
        self.output.append(7)
        if self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED


def _side(req: FakeRequest, tracked: bool = True, max_model_len: int = 1000) -> SchedulerSide:
    s = SchedulerSide(16, {}, max_model_len)
    s.on_new_request(req)
    if tracked:
        s.update_connector_output(SimpleNamespace(kv_connector_worker_meta=WorkerMeta(track={KEY}),
                                                  failed_recving=None))
    return s


def test_cap_ends_the_request_after_its_next_token_and_holds_it():
    req = FakeRequest()
    s = _side(req)
    assert s.cap(KEY) and req.max_tokens == 11
    req.step()
    assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED
    holds, _ = s.request_finished(req, [4, 5])
    assert holds is True
    held = s._meta.held  # what the next step's metadata tells the workers
    assert held and held[0].tokens == req.all_token_ids and held[0].num_computed_tokens == req.num_tokens - 1


def test_cap_that_lands_after_the_steps_own_check_holds_one_token_later():
    req = FakeRequest()
    s = _side(req)
    assert s.cap(KEY)
    req.output.append(7)        # this step's token came before the new max_tokens was read
    req.step()                   # the next one ends it, one past the cap
    assert s.request_finished(req, [4])[0] is True


def test_a_real_end_at_the_capped_step_is_not_held():
    req = FakeRequest(max_tokens=11)  # its own max_tokens ends it at the next token anyway
    s = _side(req)
    assert s.cap(KEY) and req.max_tokens == 11
    req.step()
    assert s.request_finished(req, [4])[0] is False and not s._meta.held


def test_an_end_at_the_model_length_is_not_held():
    req = FakeRequest(num_prompt=989)
    s = _side(req, max_model_len=1000)
    assert s.cap(KEY)
    req.step()                   # 1000 tokens: the model's length ends it too
    assert s.request_finished(req, [4])[0] is False


@pytest.mark.parametrize("why", ["untracked", "waiting", "unknown", "prefilling"])
def test_cap_refuses_what_it_cannot_stop_at_a_step(why):
    req = FakeRequest(num_output=0 if why == "prefilling" else 10)
    s = _side(req, tracked=why != "untracked")
    if why == "waiting":
        req.status = RequestStatus.WAITING
    assert s.cap("nope" if why == "unknown" else KEY) is False
    assert req.max_tokens == 50


def test_command_channel_round_trip_and_bad_commands(tmp_path):
    req = FakeRequest()
    s = _side(req)
    path = str(tmp_path / "commands.sock")
    server = CommandServer(path, s._on_command)

    async def go():
        client = CommandClient(path)
        replies = [await client.call({"kind": "stop", "key": KEY}),
                   await client.call({"kind": "stop", "key": "nope"}),
                   await client.call({"kind": "launch"})]
        await client.close()
        dead = CommandClient(str(tmp_path / "missing.sock"))
        return replies, await dead.call({"kind": "stop", "key": KEY}, timeout=0.5)
    replies, unreachable = asyncio.run(go())
    assert replies[0] == {"capped": True} and req.max_tokens == 11
    assert replies[1] == {"capped": False}
    assert "unknown command" in replies[2]["error"]
    assert unreachable is None
    assert server.path == path


def _step_output(scheduled: tuple[str, ...] = (), preempted: tuple[str, ...] = ()) -> SimpleNamespace:
    """The parts of a vLLM SchedulerOutput the preemption report reads."""
    cached = SimpleNamespace(req_ids=list(scheduled), new_block_ids=[None] * len(scheduled),
                             resumed_req_ids=set(scheduled))
    return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                           preempted_req_ids=set(preempted))


def test_preempted_requests_are_reported_head_first_until_resumed_or_finished():
    s = SchedulerSide(16, {}, 1000)
    sent: list[list[str]] = []
    s.notifier.send = lambda kind, key, **f: sent.append(f["keys"]) if kind == "preempted" else None
    reqs = {}
    for key in ("a#0", "b#0"):
        req = FakeRequest()
        req.request_id, req.kv_transfer_params = key + "-x", RequestTag(key).to_params()
        s.on_new_request(req)
        reqs[key] = req
    s.build_connector_meta(_step_output(scheduled=("a#0-x", "b#0-x")))
    assert sent == []                                   # nothing preempted: nothing to say
    s.build_connector_meta(_step_output(scheduled=("a#0-x",), preempted=("b#0-x",)))
    s.build_connector_meta(_step_output(preempted=("a#0-x",)))
    assert sent == [["b#0"], ["a#0", "b#0"]]            # vLLM re-queues the newest at the head
    s.build_connector_meta(_step_output(scheduled=("b#0-x",)))
    assert sent[-1] == ["a#0"]                          # b resumed
    s.build_connector_meta(_step_output())
    assert len(sent) == 3                               # unchanged: not sent again
    reqs["a#0"].status = RequestStatus.FINISHED_ABORTED
    s.request_finished(reqs["a#0"], [])
    assert sent[-1] == []


def test_a_step_that_schedules_no_tokens_is_marked_idle_for_the_worker():
    s = SchedulerSide(16, {}, 1000)
    busy, idle, unknown = _step_output(), _step_output(), _step_output()
    busy.total_num_scheduled_tokens, idle.total_num_scheduled_tokens = 3, 0
    assert s.build_connector_meta(busy).idle is False
    assert s.build_connector_meta(idle).idle is True
    assert s.build_connector_meta(unknown).idle is False   # a vLLM without the field: never wait
