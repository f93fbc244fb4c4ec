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


# -- restoring a moved request's output tokens (engine/restore.py) -----------------

def _vllm_request(out: tuple[int, ...] = (), max_tokens: int = 50, structured: bool = False,
                  num_prompt: int = 10, **sp: object):
    """A real vLLM scheduler request, tagged to restore `out`, hashed in blocks of 4."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request
    init_none_hash(sha256)
    tag = RequestTag(KEY, output_tokens=out)
    params = SamplingParams(max_tokens=max_tokens, extra_args={"kv_transfer_params": tag.to_params()},
                            structured_outputs=StructuredOutputsParams(choice=["a", "b"])
                            if structured else None, **sp)
    return Request(KEY + "-abc", list(range(100, 100 + num_prompt)), params, None,
                   block_hasher=get_request_block_hasher(4, sha256))


def _first_schedule(s: SchedulerSide, req, num_computed: int = 8):
    new = SimpleNamespace(req_id=req.request_id, num_computed_tokens=num_computed, block_ids=([3, 4],))
    out = _step_output()
    out.scheduled_new_reqs = [new]
    return s.build_connector_meta(out)


def test_restored_outputs_are_the_requests_own_from_the_start():
    """Queued with O: O are output tokens (they count for max_tokens and
    min_tokens), their full blocks are hashed for the prefix lookup, and the
    first step that schedules the request tells the workers O."""
    req = _vllm_request(out=(7, 8, 9, 10, 11, 12))
    assert len(req.block_hashes) == 2                  # the prompt's full blocks
    s = SchedulerSide(4, {}, 1000)
    s.on_new_request(req)
    assert list(req.output_token_ids) == [7, 8, 9, 10, 11, 12] and req.num_prompt_tokens == 10
    assert len(req.block_hashes) == 4                  # P+O: 16 tokens
    assert req.prefill_stats is None                   # vLLM's prompt-only accounting is off
    assert s.get_num_new_matched_tokens(req, 12) == (0, False)
    assert _first_schedule(s, req, 12).restored_outputs == {req.request_id: [7, 8, 9, 10, 11, 12]}
    assert _first_schedule(s, req).restored_outputs == {}      # named once only
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.request_finished(req, [])[1] == {"llumigrate": {"restored": 6, "cached": 12}}


def test_a_fresh_request_is_untouched_and_reports_nothing():
    req = _vllm_request()
    s = SchedulerSide(4, {}, 1000)
    s.on_new_request(req)
    assert req.num_output_tokens == 0 and req.prefill_stats is not None
    assert _first_schedule(s, req).restored_outputs == {}
    req.status = RequestStatus.FINISHED_STOPPED
    assert s.request_finished(req, []) == (False, None)


def _assert_failing(req, match: str) -> None:
    """Set to fail with "error" at its next schedule (vLLM's failed-grammar path)."""
    assert req.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    error = req.structured_output_request.grammar
    assert isinstance(error, Exception) and match in str(error)


@pytest.mark.parametrize("why,match", [
    ("too_long", "leave none of max_tokens"),
    ("model_len", "leave no room"),
    ("skip_prefix_cache", "skip_reading_prefix_cache"),
])
def test_a_restore_that_cannot_be_exact_fails_the_request(why, match):
    kw: dict = {"too_long": {"max_tokens": 6}, "model_len": {"num_prompt": 994},
                "skip_prefix_cache": {"skip_reading_prefix_cache": True}}[why]
    req = _vllm_request(out=(1, 2, 3, 4, 5, 6), **kw)
    s = SchedulerSide(4, {}, 1000)
    s.on_new_request(req)
    assert req.num_output_tokens == 0
    _assert_failing(req, match)
    assert _first_schedule(s, req).restored_outputs == {}


class FakeGrammar:
    """A compiled grammar accepting tokens below `limit`."""

    def __init__(self, limit: int = 100) -> None:
        self.limit, self.accepted = limit, []

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        if any(t >= self.limit for t in tokens):
            return False
        self.accepted.extend(tokens)
        return True


def _structured(out: tuple[int, ...], grammar: FakeGrammar, facts=None):
    from vllm.v1.structured_output.backend_types import StructuredOutputGrammar
    StructuredOutputGrammar.register(FakeGrammar)
    req = _vllm_request(out=out, structured=True)
    assert req.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    s = SchedulerSide(4, {}, 1000, facts)
    s.on_new_request(req)
    req.structured_output_request.grammar = grammar  # compiled ...
    req.status = RequestStatus.WAITING               # ... and promoted by the scheduler
    return s, req


def test_the_grammar_takes_the_restored_tokens_once_before_the_first_bitmask():
    grammar = FakeGrammar()
    s, req = _structured((5, 6, 7), grammar)
    assert grammar.accepted == []                    # not compiled when queued
    assert s.get_num_new_matched_tokens(req, 8) == (0, False)
    assert grammar.accepted == [5, 6, 7] and req.structured_output_request.reasoning_ended
    s.get_num_new_matched_tokens(req, 8)             # asked again (allocation failed, preempted)
    assert grammar.accepted == [5, 6, 7]


def test_a_grammar_that_refuses_the_restored_tokens_fails_the_request():
    s, req = _structured((5, 600, 7), FakeGrammar(limit=100))
    assert s.get_num_new_matched_tokens(req, 8) == (None, False)   # not scheduled this step
    _assert_failing(req, "grammar rejected")


def test_a_grammar_behind_a_reasoning_parser_is_not_guessed():
    from llumigrate.engine.refusal import EngineFacts
    facts = EngineFacts(reasoning_parser=True)
    req = _vllm_request(out=(5, 6), structured=True)
    s = SchedulerSide(4, {}, 1000, facts)
    s.on_new_request(req)                                          # refused when queued
    _assert_failing(req, "reasoning parser")
    grammar = FakeGrammar()
    s, req = _structured((5, 6), grammar, EngineFacts(reasoning_parser=True,
                                                       structured_in_reasoning=True))
    assert s.get_num_new_matched_tokens(req, 8) == (0, False) and grammar.accepted == [5, 6]


def test_request_tag_round_trips_its_restored_outputs_over_msgpack():
    import msgpack

    from llumigrate.engine.params import LoadSpec
    tag = RequestTag("k#1", LoadSpec("h", 1, "k#0", 40, final=True), b"\x00\x01gen", (5, 0, 2047))
    wire = msgpack.unpackb(msgpack.packb(tag.to_params()))
    assert wire["llumigrate"]["out"] == [5, 0, 2047]
    assert RequestTag.from_params(wire) == tag
    assert "out" not in RequestTag("k#0").to_params()["llumigrate"]   # a fresh request
    old = {"llumigrate": {"key": "k#0", "gen": None}}                 # a tag without the field
    assert RequestTag.from_params(old) == RequestTag("k#0")
    assert RequestTag("k", output_tokens=[1, 2]).output_tokens == (1, 2)
