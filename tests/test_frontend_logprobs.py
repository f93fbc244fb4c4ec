"""Output logprobs through the OpenAI frontend (fake backend, real HTTP and
the `openai` client): the shapes of vLLM's server, carried across hops, with
a position that lost its logprobs (a token recovered at a stop) shown as
null, and cut with the tokens at a stop string."""

from __future__ import annotations

import openai
import pytest

from fake_generate_backend import FakeBackend, FakeConfig, ServerThread, fake_logprobs, make_backend
from llumigrate.frontend import Metrics, build_app
from llumigrate.frontend.logprobs import chat_logprobs, completion_logprobs
from llumigrate.frontend.tokenizer import ModelTokenizer


@pytest.fixture(scope="module")
def tok() -> ModelTokenizer:
    from llumigrate.model.tiny import ensure_tiny_model
    return ModelTokenizer(str(ensure_tiny_model()))


@pytest.fixture(scope="module")
def served(tok: ModelTokenizer):
    backend = make_backend(tok, tok.hf.name_or_path)
    srv = ServerThread(build_app(backend, Metrics(), tokenizer=tok))
    srv.backend = backend
    yield srv
    srv.close()


@pytest.fixture
def backend(served) -> FakeBackend:
    served.backend.config = FakeConfig()
    return served.backend


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def _tokens(backend: FakeBackend, n: int) -> list[int]:
    return backend.outputs({"max_tokens": n, "ignore_eos": True})[0]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_across_hops(client, backend, tok, stream):
    backend.config = FakeConfig(chunk_sizes=(2, 1), hop_every=4, lost_logprobs=(5,))
    tokens = _tokens(backend, 12)
    kw = dict(model="tiny", prompt=[5, 6, 7], max_tokens=12, logprobs=2, extra_body={"ignore_eos": True})
    if stream:
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        text = ""
        for chunk in client.completions.create(stream=True, **kw):
            got = chunk.choices[0].logprobs
            for k in lp:
                lp[k] += getattr(got, k)
            text += chunk.choices[0].text
    else:
        r = client.completions.create(**kw)
        got = r.choices[0].logprobs
        lp = {k: getattr(got, k) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        text = r.choices[0].text
    assert backend.submissions[-1].sampling["logprobs"] == 2
    assert lp["tokens"] == [tok.token_text(t) for t in tokens]
    want = [fake_logprobs(i, t, 2) for i, t in enumerate(tokens)]
    assert lp["token_logprobs"] == [None if i == 5 else w[0][1] for i, w in enumerate(want)]
    for i, (top, w) in enumerate(zip(lp["top_logprobs"], want)):
        assert top == (None if i == 5 else {tok.token_text(t): v for t, v, _ in w})
    offsets = [sum(len(x) for x in lp["tokens"][:i]) for i in range(len(tokens))]
    assert lp["text_offset"] == offsets and "".join(lp["tokens"]) == text


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(client, backend, tok, stream):
    backend.config = FakeConfig(chunk_sizes=(3,), hop_every=2)
    tokens = _tokens(backend, 9)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=9,
              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    if stream:
        content = [c for chunk in client.chat.completions.create(stream=True, **kw) if chunk.choices
                   and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert [c.token for c in content] == [tok.token_text(t) for t in tokens]
    for i, (c, t) in enumerate(zip(content, tokens)):
        w = fake_logprobs(i, t, 2)
        assert c.logprob == w[0][1] and c.bytes == list(c.token.encode())
        # vLLM's order: the sampled token first, `top_logprobs` entries in all.
        assert [(x.token, x.logprob) for x in c.top_logprobs] == [(tok.token_text(a), b) for a, b, _ in w[:2]]


def test_chat_logprobs_without_top(client, backend):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, logprobs=True, extra_body={"ignore_eos": True})
    assert backend.submissions[-1].sampling["logprobs"] == 0
    assert len(r.choices[0].logprobs.content) == 4
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].logprobs is None and "logprobs" not in backend.submissions[-1].sampling


def test_logprobs_cut_with_the_tokens_at_a_stop_string(client, backend, tok):
    tokens = _tokens(backend, 40)
    text = tok.hf.decode(tokens)
    stop = "lazy"
    r = client.completions.create(model="tiny", prompt=[5], max_tokens=40, logprobs=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]
    got = r.choices[0].logprobs
    n = len(got.tokens)
    assert n < len(tokens) and "".join(got.tokens).startswith(r.choices[0].text)
    assert stop in "".join(got.tokens)  # up to the token completing the stop string, as kept
    assert got.token_logprobs == [fake_logprobs(i, t, 0)[0][1] for i, t in enumerate(tokens[:n])]


def test_format_helpers_floor_minus_infinity_and_skip_unknown_tokens():
    text_of = {1: "a", 2: "bc"}.get
    out = completion_logprobs(text_of, [1, 2], [[[1, float("-inf"), 3], [2, -0.1, 1]], [[1, -2.0, 2]]], 1, 10)
    assert out["token_logprobs"] == [-9999.0, None]  # token 2 is missing from its own entries
    assert out["top_logprobs"] == [{"a": -9999.0, "bc": -0.1}, None]
    assert out["text_offset"] == [10, 11]
    chat = chat_logprobs(text_of, [1], [[[1, -0.5, 1], [2, -1.5, 2]]], 5)
    assert chat["content"][0]["top_logprobs"][1] == {"token": "bc", "logprob": -1.5, "bytes": [98, 99]}
