"""From output tokens to the text a client sees: detokenization, stop strings
and the stop-token rule, with vLLM's semantics.

Stop strings are matched here, on the text of all hops joined: an engine
never sees them, so a stop string spanning a migration is still found.
"""

from __future__ import annotations

import sys
from bisect import bisect_left
from dataclasses import dataclass

from llumigrate.frontend.detok import Detokenizer


@dataclass(frozen=True)
class StopRules:
    """`stop`: stop strings; `stop_token_ids`: ids that may end generation (EOS
    unless ignore_eos, plus the request's stop_token_ids): their text is left
    out unless `include_stop_str_in_output`; stop strings count only in text
    after the first `min_tokens` tokens."""

    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    include_stop_str_in_output: bool = False
    min_tokens: int = 0


class TextStream:
    """One request's output. Feed tokens with `add`, the backend's end with
    `finish`; `take_text` returns the text safe to show since the last call.

    Invariants: `token_ids` are the output tokens up to and including the one
    that stopped the request (tokens after a matched stop string are dropped);
    `text` is their detokenized text, cut at the stop string; text that may be
    the start of a stop string is held back until it is known not to be.
    """

    def __init__(self, detok: Detokenizer, rules: StopRules) -> None:
        self._detok = detok
        self._rules = rules
        self.token_ids: list[int] = []
        # Aligned with token_ids once a token came with logprobs (None entries
        # for tokens that came without).
        self.logprobs: list[list[list] | None] | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._pending: int | None = None  # a possible stop token, not decoded yet
        self._shown = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_ids: list[int], logprobs: list | None = None) -> None:
        """Append output tokens (with their logprobs, one entry per token, if
        the request asked for them); may finish the request on a stop string."""
        if self.finished or not token_ids:
            return
        first_decoded = len(self.token_ids) - (self._pending is not None)
        if logprobs is not None or self.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = [None] * len(self.token_ids)
            self.logprobs.extend(logprobs if logprobs is not None else [None] * len(token_ids))
        self.token_ids.extend(token_ids)
        decode = self.token_ids[first_decoded:]
        self._pending = None
        if decode[-1] in self._rules.stop_token_ids and not self._rules.include_stop_str_in_output:
            # NOTE: if this token ends the request its text is not shown; only
            # the next add() (or finish) tells, so its decoding waits.
            self._pending = decode.pop()
        offsets = [len(self.text)]
        for token_id in decode:
            self.text += self._detok.decode_next(token_id)
            offsets.append(len(self.text))
        self._check_stop_strings(first_decoded, offsets)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        """The backend ended the request (reason "stop", "length", "abort", ...)."""
        if self.finished:
            return
        if self._pending is not None and reason != "stop":
            self.text += self._detok.decode_next(self._pending)
        self._pending = None
        self.finish_reason, self.stop_reason = reason, stop_reason

    def take_text(self) -> str:
        """Text not shown before; holds back a possible stop-string start."""
        end = len(self.text) if self.finished else len(self.text) - self._held_back()
        if end <= self._shown:
            return ""
        out, self._shown = self.text[self._shown:end], end
        return out

    def _held_back(self) -> int:
        rules = self._rules
        if not rules.stop or rules.include_stop_str_in_output:
            return 0
        longest = max(len(s) for s in rules.stop) - 1
        for n in range(min(longest, len(self.text) - self._shown), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in rules.stop):
                return n
        return 0

    def _check_stop_strings(self, first_decoded: int, offsets: list[int]) -> None:
        """`offsets[i]`: text length before the i-th decoded token, whose index
        in `token_ids` is `first_decoded + i`."""
        rules = self._rules
        decoded_end = first_decoded + len(offsets) - 1
        if not rules.stop or decoded_end <= rules.min_tokens:
            return
        start = offsets[max(rules.min_tokens - first_decoded, 0)]
        match = find_stop_string(self.text, len(self.text) - start, rules.stop)
        if match is None:
            return
        stop_str, begin = match
        cut = begin + len(stop_str) if rules.include_stop_str_in_output else begin
        # Keep tokens up to the one completing the stop string.
        num_kept = bisect_left(offsets, begin + len(stop_str), lo=1)
        del self.token_ids[first_decoded + num_kept:]
        if self.logprobs is not None:
            del self.logprobs[first_decoded + num_kept:]
        self.text = self.text[:cut]
        self._pending = None
        self.finish_reason, self.stop_reason = "stop", stop_str


def find_stop_string(text: str, new_chars: int, stop: tuple[str, ...]) -> tuple[str, int] | None:
    """The stop string ending earliest among those that end in the last
    `new_chars` characters of `text` (ties: list order), with its start index."""
    best: tuple[str, int] | None = None
    best_end = sys.maxsize
    for s in stop:
        i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if i != -1 and i + len(s) < best_end:
            best, best_end = (s, i), i + len(s)
    return best
