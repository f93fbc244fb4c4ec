"""The OpenAI frontend against a fake backend, over real HTTP (uvicorn on
127.0.0.1, port 0) with the `openai` client and httpx. No engines."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from fake_generate_backend import FakeBackend, FakeConfig, ServerThread, make_backend
from llumigrate.frontend import Metrics, build_app
from llumigrate.frontend.output import StopRules, TextStream
from llumigrate.frontend.tokenizer import ModelTokenizer

API_KEY = "sekrit"


@pytest.fixture(scope="module")
def model_path() -> str:
    from llumigrate.model.tiny import ensure_tiny_model
    return str(ensure_tiny_model())


@pytest.fixture(scope="module")
def tok(model_path: str) -> ModelTokenizer:
    return ModelTokenizer(model_path)


@pytest.fixture(scope="module")
def served(tok: ModelTokenizer, model_path: str):
    backend = make_backend(tok, model_path)
    metrics = Metrics()
    srv = ServerThread(build_app(backend, metrics, tokenizer=tok))
    srv.backend, srv.metrics = backend, metrics
    yield srv
    srv.close()


@pytest.fixture
def backend(served) -> FakeBackend:
    served.backend.config = FakeConfig()
    served.backend.is_healthy = True
    return served.backend


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def expected(backend: FakeBackend, tok: ModelTokenizer, max_tokens: int, **sampling) -> tuple[list[int], str]:
    tokens, _, _ = backend.outputs({"max_tokens": max_tokens, **sampling})
    return tokens, tok.hf.decode(tokens, skip_special_tokens=True)


def stream_completion(client: openai.OpenAI, **kw) -> tuple[list[str], list, dict | None]:
    texts, finishes, usage = [], [], None
    for chunk in client.completions.create(model="tiny", stream=True,
                                           stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage.model_dump()
    return texts, finishes, usage


# -- completions and chat --------------------------------------------------------------------
def test_completion_non_streaming(client, backend, tok):
    tokens, text = expected(backend, tok, 20)
    r = client.completions.create(model="tiny", prompt="hello world", max_tokens=20)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tok.encode("hello world", True))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 20, n_prompt + 20)
    assert backend.submissions[-1].prompt_token_ids == tok.encode("hello world", True)


@pytest.mark.parametrize("chunk_sizes,hop_every", [((1,), 0), ((3, 1, 5, 2), 4), ((7,), 3)])
def test_completion_stream_spans_hops(client, backend, tok, chunk_sizes, hop_every):
    backend.config = FakeConfig(chunk_sizes=chunk_sizes, hop_every=hop_every, delay_s=0.001)
    tokens, text = expected(backend, tok, 33)
    texts, finishes, usage = stream_completion(client, prompt=[5, 6, 7], max_tokens=33)
    assert "".join(texts) == text
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert usage == {"prompt_tokens": 3, "completion_tokens": 33, "total_tokens": 36,
                     "completion_tokens_details": None, "prompt_tokens_details": None}
    assert all("\ufffd" not in t for t in texts)


def test_chat_streaming_and_not(client, backend, tok):
    backend.config = FakeConfig(chunk_sizes=(2, 1), hop_every=5)
    messages = [{"role": "user", "content": "hi there"}]
    prompt_ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True, continue_final_message=False,
                                            template_kwargs=None), False)
    _, text = expected(backend, tok, 25)
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=25)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 25
    assert backend.submissions[-1].prompt_token_ids == prompt_ids
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=25, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 25 and not chunks[-1].choices


def test_chat_max_tokens_defaults_to_room_left(client, backend, tok, served):
    backend.config = FakeConfig(source=tok.encode("ab", False))
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    sub = backend.submissions[-1]
    assert sub.sampling["max_tokens"] == backend.max_model_len - len(sub.prompt_token_ids)


def test_echo_non_streaming(client, backend, tok):
    _, text = expected(backend, tok, 5)
    r = client.completions.create(model="tiny", prompt="say:", max_tokens=5, echo=True)
    assert r.choices[0].text == "say:" + text


# -- stop strings, stop tokens, UTF-8 ---------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_deltas(client, backend, tok, stream, include):
    backend.config = FakeConfig(chunk_sizes=(1, 2), hop_every=3, delay_s=0.001)
    tokens, text = expected(backend, tok, 60)
    stop = "lazy d"  # spans token (and delta) boundaries
    begin = text.index(stop)
    want = text[:begin + len(stop)] if include else text[:begin]
    # tokens up to and including the one that completes the stop string
    num_tokens = next(n for n in range(1, 61) if len(tok.hf.decode(tokens[:n])) >= begin + len(stop))
    kw = dict(prompt="p", max_tokens=60, stop=[stop, "never"], extra_body={"include_stop_str_in_output": include})
    if stream:
        texts, finishes, usage = stream_completion(client, **kw)
        got, finish = "".join(texts), finishes[-1]  # SSE cannot take text back: nothing extra was sent
    else:
        r = client.completions.create(model="tiny", **kw)
        got, finish, usage = r.choices[0].text, r.choices[0].finish_reason, r.usage.model_dump()
        assert r.choices[0].model_extra["stop_reason"] == stop
    assert got == want and finish == "stop"
    assert usage["completion_tokens"] == num_tokens
    assert "stop" not in backend.submissions[-1].sampling
    rid = backend.submissions[-1].request_id
    _wait(lambda: rid in backend.aborted)


def test_stop_string_respects_min_tokens(client, backend, tok):
    tokens, text = expected(backend, tok, 80)
    r = client.completions.create(model="tiny", prompt="p", max_tokens=80, stop=["The"],
                                  extra_body={"min_tokens": 3})
    assert r.choices[0].text == text[:text.index("The", 1)]


def test_eos_and_stop_token_ids(client, backend, tok):
    words = tok.encode(" one two three", False)
    eos = tok.hf.eos_token_id
    backend.config = FakeConfig(source=words + [eos], chunk_sizes=(2,))
    r = client.completions.create(model="tiny", prompt="p", max_tokens=50)
    assert r.choices[0].text == " one two three" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(words) + 1
    texts, finishes, usage = stream_completion(client, prompt="p", max_tokens=50,
                                               extra_body={"stop_token_ids": [words[-1]]})
    assert "".join(texts) == tok.hf.decode(words[:-1]) and finishes[-1] == "stop"
    assert usage["completion_tokens"] == len(words)
    r = client.completions.create(model="tiny", prompt="p", max_tokens=50,
                                  extra_body={"stop_token_ids": [words[-1]], "include_stop_str_in_output": True})
    assert r.choices[0].text == " one two three" and r.choices[0].model_extra["stop_reason"] == words[-1]


def test_multibyte_utf8_split_across_tokens(client, backend, tok):
    text = "a𝄞b 🙂 中文 𝄞"
    ids = tok.encode(text, False)
    assert len(ids) > len(text.replace(" ", "")), "the clef must take several byte tokens"
    backend.config = FakeConfig(source=ids, chunk_sizes=(1,), delay_s=0.002)
    texts, _, _ = stream_completion(client, prompt="p", max_tokens=len(ids))
    assert "".join(texts) == text
    assert all("\ufffd" not in t for t in texts)


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- parameters and refusals ------------------------------------------------------------------
def test_sampling_dict_and_priority(client, backend):
    client.completions.create(model="tiny", prompt="p", max_tokens=4, temperature=0.5, top_p=0.9, seed=7,
                              logit_bias={"65": 200}, extra_body={
                                  "priority": -3, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                  "ignore_eos": True, "min_tokens": 2, "stop_token_ids": [9], "stop": "x"})
    sub = backend.submissions[-1]
    assert sub.priority == -3
    assert sub.sampling == {"temperature": 0.5, "top_p": 0.9, "seed": 7, "top_k": 5, "min_p": 0.1,
                            "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2, "max_tokens": 4,
                            "stop_token_ids": [9], "logit_bias": {"65": 100.0}}
    assert set(sub.sampling) <= _engine_sampling_fields()


def _engine_sampling_fields() -> set[str]:
    """SAMPLING_FIELDS read from the engine's source (importing it would import vLLM)."""
    src = Path(__file__).parent.parent / "llumigrate" / "engine" / "runtime.py"
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "SAMPLING_FIELDS":
            return set(ast.literal_eval(node.value))
    raise AssertionError("SAMPLING_FIELDS not found")


BAD_COMPLETIONS = [
    ({"n": 2}, "n"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 1, "echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"stream": True, "echo": True}, "echo"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": [1]}, "temperature"),
    ({"prompt": "word " * 600}, "prompt"),
    ({"prompt": ""}, None),
    ({"stream_options": {"include_usage": True}}, None),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize("extra,param", BAD_COMPLETIONS)
def test_completion_rejections(served, backend, extra, param):
    before = len(backend.submissions)
    r = httpx.post(served.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["type"] == "BadRequestError" and err["message"]
    if param:
        assert param in (err["param"] or ""), err
    assert len(backend.submissions) == before


@pytest.mark.parametrize("extra,param", [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                                         ({"top_logprobs": 2}, "top_logprobs"),
                                         ({"n": 3}, "n"), ({"messages": []}, "messages"),
                                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")])
def test_chat_rejections(served, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(served.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400 and param in (r.json()["error"]["param"] or "")


def test_unknown_model_and_bad_json(served, client):
    r = httpx.post(served.url + "/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="tiny", prompt="hi", suffix="!")


# -- failures and disconnects -----------------------------------------------------------------
def test_backend_error_mid_stream(served, client, backend):
    backend.config = FakeConfig(fail_after=3)
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "p", "max_tokens": 10, "stream": True})
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "instance lost" in json.loads(events[-2])["error"]["message"]
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "p", "max_tokens": 10})
    assert r.status_code == 500


def test_client_disconnect_aborts_stream(served, backend):
    backend.config = FakeConfig(delay_s=0.02)
    with httpx.stream("POST", served.url + "/v1/completions",
                      json={"prompt": "p", "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    rid = backend.submissions[-1].request_id
    _wait(lambda: rid in backend.aborted)


def test_client_disconnect_aborts_non_streaming(served, backend):
    backend.config = FakeConfig(delay_s=0.02)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", timeout=0.3,
                   json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 400})
    rid = backend.submissions[-1].request_id
    _wait(lambda: rid in backend.aborted)


# -- models, health, metrics, auth ------------------------------------------------------------
def test_models_and_health(served, client, backend):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(served.url + "/health").status_code == 200
    backend.is_healthy = False
    assert httpx.get(served.url + "/health").status_code == 503


def test_metrics_endpoint(served, client, backend):
    served.metrics.set_instance("i0", free_blocks=10, num_blocks=64, up=1)
    served.metrics.observe_dispatch("i0")
    served.metrics.observe_migration("committed", "load", {"precopy": 0.02, "stop_copy": 0.004}, 1 << 20, 0.004)
    client.completions.create(model="tiny", prompt="p", max_tokens=3)
    text = httpx.get(served.url + "/metrics").text
    for line in ('llumigrate_instance_free_blocks{instance="i0"} 10.0',
                 'llumigrate_dispatches_total{instance="i0"} 1.0',
                 'llumigrate_migrations_total{outcome="committed",reason="load"} 1.0',
                 'llumigrate_migration_stage_seconds_count{stage="precopy"} 1.0',
                 'llumigrate_migration_bytes_count 1.0',
                 'llumigrate_migration_downtime_seconds_count 1.0',
                 'llumigrate_request_ttft_seconds_count'):
        assert line in text, line
    assert 'llumigrate_requests_total{finish_reason="length"}' in text
    with pytest.raises(ValueError, match="allowed"):
        served.metrics.set_instance("i0", bogus=1)


def test_api_key(tok, model_path):
    backend = make_backend(tok, model_path)
    srv = ServerThread(build_app(backend, Metrics(), api_key=API_KEY, tokenizer=tok))
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p", "max_tokens": 2})
        assert r.status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0)
        assert good.completions.create(model="tiny", prompt="p", max_tokens=2).usage.completion_tokens == 2
    finally:
        srv.close()


# -- the output stage alone -------------------------------------------------------------------
def test_text_stream_holds_back_only_possible_stop_starts(tok):
    ids = tok.encode(" ab cd ab ce", False)
    ts = TextStream(tok.detokenizer([1], True), StopRules(stop=("ab cx",)))
    shown = ""
    for i in ids:
        ts.add([i])
        shown += ts.take_text()
        assert ts.text.startswith(shown)
        assert len(ts.text) - len(shown) <= len("ab cx") - 1
    ts.finish("length")
    assert shown + ts.take_text() == " ab cd ab ce" and ts.finish_reason == "length"


def test_text_stream_stop_token_text_hidden_unless_included(tok):
    ids = tok.encode(" one two", False)
    for include, want in ((False, " one"), (True, " one two")):
        ts = TextStream(tok.detokenizer([1], True), StopRules(stop_token_ids=frozenset({ids[-1]}),
                                                               include_stop_str_in_output=include))
        ts.add(ids)
        shown = ts.take_text()
        ts.finish("stop", ids[-1])
        assert shown + ts.take_text() == want and ts.token_ids == ids
    # A possible stop token that does not end the request is shown once more tokens come.
    ts = TextStream(tok.detokenizer([1], True), StopRules(stop_token_ids=frozenset({ids[-1]})))
    ts.add(ids)
    ts.add(ids)
    ts.finish("length")
    assert ts.text == " one two one two"


def test_special_tokens_shown_when_not_skipped(client, backend, tok):
    words = tok.encode(" hi", False)
    backend.config = FakeConfig(source=words + [tok.hf.eos_token_id])
    body = dict(prompt="p", max_tokens=2 * (len(words) + 1), extra_body={"ignore_eos": True})
    assert client.completions.create(model="tiny", **body).choices[0].text == " hi hi"
    body["extra_body"]["skip_special_tokens"] = False
    assert client.completions.create(model="tiny", **body).choices[0].text == " hi</s> hi</s>"


def test_continuous_usage_and_chat_stop(client, backend, tok):
    backend.config = FakeConfig(delay_s=0.001)
    usages = [c.usage.completion_tokens for c in client.completions.create(
        model="tiny", prompt="p", max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})]
    assert usages == sorted(usages) and usages[-1] == 6
    _, text = expected(backend, tok, 40)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=40, stop="fox", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text[:text.index("fox")]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].model_extra["stop_reason"] == "fox"


def test_metrics_registries_are_independent():
    a, b = Metrics(), Metrics()
    a.observe_dispatch("i0")
    a.set_instance("i1", kv_cache_usage=0.5, draining=1)
    a.remove_instance("i1")
    text_a, content_type = a.render()
    assert b'llumigrate_dispatches_total{instance="i0"} 1.0' in text_a
    assert b'instance="i1"' not in text_a
    assert b"llumigrate_dispatches_total{" not in b.render()[0]
    assert content_type.startswith("text/plain")


def test_slow_detokenizer_matches_fast(tok):
    from fake_generate_backend import DEFAULT_TEXT
    from llumigrate.frontend.detok import IncrementalDetokenizer, SlowIncrementalDetokenizer
    ids = tok.encode(DEFAULT_TEXT + "a𝄞b 🙂</s>", False)
    prompt = tok.encode("prompt 中", False)
    for skip in (True, False):
        fast = IncrementalDetokenizer(tok.hf.backend_tokenizer, prompt, skip)
        slow = SlowIncrementalDetokenizer(tok.hf, prompt, skip)
        pieces = [(fast.decode_next(i), slow.decode_next(i)) for i in ids]
        want = tok.hf.decode(ids, skip_special_tokens=skip)
        assert "".join(p[0] for p in pieces) == "".join(p[1] for p in pieces) == want
        assert all("\ufffd" not in p[0] + p[1] for p in pieces)
        assert ("", "") in pieces  # tokens holding part of a character show nothing yet
