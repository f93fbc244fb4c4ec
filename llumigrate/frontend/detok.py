"""Incremental detokenization with vLLM's semantics (its `FastIncrementalDetokenizer`).

A `tokenizers.decoders.DecodeStream` primed with the prompt ids turns each new
token into the text it completes: a multi-byte UTF-8 character split across
tokens comes out whole, with the token that completes it (earlier tokens give
""); leading spaces are resolved against the end of the prompt (its last
`PROMPT_CONTEXT` tokens: a stream primed with a whole long prompt costs
O(prompt) per step). Bytes of a character the output never completes are
never emitted. Tokenizers without a Rust backend get `SlowIncrementalDetokenizer`.
"""

from __future__ import annotations

import logging

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

# tokenizers raises this when a byte-level stream produced non-monotonic text;
# vLLM resets the stream and goes on (vllm-project/vllm#17448).
_INVALID_PREFIX = "Invalid prefix encountered"
PROMPT_CONTEXT = 8


class IncrementalDetokenizer:
    """Decodes one request's output tokens, one at a time, in order."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=list(prompt_token_ids[-PROMPT_CONTEXT:]),
                                    skip_special_tokens=skip_special_tokens)

    def decode_next(self, token_id: int) -> str:
        """The text `token_id` completes; "" while a character is incomplete."""
        try:
            text = self._stream.step(self._tokenizer, token_id)
        except (OverflowError, TypeError):
            logger.warning("invalid token id %r: decoded as ''", token_id)
            return ""
        except Exception as e:  # tokenizers raises a plain Exception
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            text = self._stream.step(self._tokenizer, token_id)
        return text or ""


class SlowIncrementalDetokenizer:
    """The same contract for any tokenizer with `decode(ids, skip_special_tokens=...)`:
    the text of the tokens since the last emitted boundary, diffed against the
    text before them, emitted only once it no longer ends in U+FFFD."""

    def __init__(self, tokenizer: object, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def decode_next(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


Detokenizer = IncrementalDetokenizer | SlowIncrementalDetokenizer
