"""The served model's tokenizer, chat template and generation defaults, read
from its Hugging Face folder (`GenerateBackend.model_path`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from llumigrate.frontend.detok import Detokenizer, IncrementalDetokenizer, SlowIncrementalDetokenizer
from llumigrate.frontend.errors import bad_request, unsupported

# generation_config.json keys that become default sampling values, as vLLM's
# `--generation-config auto` does.
_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class ModelTokenizer:
    """Prompt encoding, chat rendering and per-request detokenizers.

    `eos_token_ids` holds every id that ends generation unless `ignore_eos`
    (the tokenizer's EOS and generation_config's `eos_token_id`, one or many).
    """

    def __init__(self, model_path: str) -> None:
        self.hf = AutoTokenizer.from_pretrained(model_path)
        self.vocab_size = len(self.hf)
        gen = _read_generation_config(Path(model_path))
        eos = gen.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            eos_ids.add(int(self.hf.eos_token_id))
        self.eos_token_ids = frozenset(int(i) for i in eos_ids)
        self.sampling_defaults = {k: gen[k] for k in _DEFAULT_KEYS if gen.get(k) is not None}
        self._token_texts: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it (vLLM decodes it alone)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.hf.decode([token_id]) or ""
        return text

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                    continue_final_message: bool, template_kwargs: dict | None) -> str:
        """The chat-templated prompt text; 400 for messages it cannot render."""
        if add_generation_prompt and continue_final_message:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              "continue_final_message")
        conversation = [_text_message(m, i) for i, m in enumerate(messages)]
        try:
            return self.hf.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(template_kwargs or {}))
        except (ValueError, TypeError, KeyError) as e:
            raise bad_request(f"cannot apply the chat template: {e}", "messages") from e

    def detokenizer(self, prompt_token_ids: list[int],
                    skip_special_tokens: bool) -> Detokenizer:
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            return SlowIncrementalDetokenizer(self.hf, prompt_token_ids, skip_special_tokens)
        return IncrementalDetokenizer(backend, prompt_token_ids, skip_special_tokens)


def _read_generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def _text_message(message: dict[str, Any], index: int) -> dict[str, Any]:
    """A message with its content as one string (text parts joined by newlines,
    as vLLM's "string" content format does)."""
    if "role" not in message:
        raise bad_request(f"messages[{index}] has no role", f"messages.{index}.role")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return {**message, "content": content or ""}
    if not isinstance(content, list):
        raise bad_request(f"messages[{index}].content must be a string or a list of parts",
                          f"messages.{index}.content")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise unsupported("non-text message content", f"messages.{index}.content")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}
