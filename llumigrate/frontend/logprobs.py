"""Output logprobs in the shapes of vLLM's OpenAI server: the completions
API's `{tokens, token_logprobs, top_logprobs, text_offset}` and the chat
API's `{content: [{token, logprob, bytes, top_logprobs}]}`.

A token's logprobs arrive as `[[token_id, logprob, rank], ...]`, the sampled
token first and then the top ones (vLLM's order), or None for a token whose
logprobs were lost (a token recovered from a stopped source's record): it is
shown with a null logprob, as vLLM shows a position it has none for.
"""

from __future__ import annotations

from collections.abc import Callable

# vLLM's floor for -inf (JSON has no infinity), and its default max_logprobs.
MIN_LOGPROB = -9999.0
MAX_LOGPROBS = 20

TokenText = Callable[[int], str]


def completion_logprobs(text_of: TokenText, token_ids: list[int], logprobs: list,
                        num_top: int, text_offset: int) -> dict:
    """`num_top`: the request's `logprobs` (top entries besides the sampled
    token); `text_offset`: the text length before the first token."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entries in zip(token_ids, logprobs):
        token = text_of(token_id)
        offsets.append(text_offset)
        text_offset += len(token)
        tokens.append(token)
        by_id = _by_id(entries)
        if by_id is None or token_id not in by_id:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_floor(by_id[token_id]))
        top.append({text_of(t): _floor(lp) for i, (t, lp, _) in enumerate(entries) if i <= num_top})
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
            "top_logprobs": top}


def chat_logprobs(text_of: TokenText, token_ids: list[int], logprobs: list, num_top: int) -> dict:
    """`num_top`: the request's `top_logprobs`."""
    content = []
    for token_id, entries in zip(token_ids, logprobs):
        token = text_of(token_id)
        by_id = _by_id(entries)
        if by_id is None or token_id not in by_id:
            content.append({"token": token, "logprob": MIN_LOGPROB, "bytes": _bytes(token),
                            "top_logprobs": []})
            continue
        content.append({
            "token": token, "logprob": _floor(by_id[token_id]), "bytes": _bytes(token),
            "top_logprobs": [{"token": (t_text := text_of(t)), "logprob": _floor(lp),
                              "bytes": _bytes(t_text)}
                             for i, (t, lp, _) in enumerate(entries) if i < num_top]})
    return {"content": content}


def _by_id(entries: list | None) -> dict[int, float] | None:
    return None if entries is None else {int(t): float(lp) for t, lp, _ in entries}


def _floor(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
