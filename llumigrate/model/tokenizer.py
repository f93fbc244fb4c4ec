"""Byte-level BPE tokenizer for the tiny model, trained on generated text.

The corpus is made here from embedded word lists with a fixed-seed RNG, so the
tokenizer depends only on the vocabulary size: no downloads, and the same
`vocab_size` always gives the same `tokenizer.json`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, then the specials

# Lines "role: content", then "assistant: " when a reply is wanted.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' + message['content'] + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)

_CORPUS_SEED = 20240611
_NUM_SENTENCES = 6000

_WORDS = """
the a an of to and in is it that for on with as was at by be this from or
have not are but what all were when we there can your which their said if do
will each about how up out them then she many some so these would other into
has more her two like him see time could no make than first been its who now
people my made over did down only way find use may water long little very
after words called just where most know get through back much before go good
new write our used me man too any day same right look think also around
another came come work three word must because does part even place well such
here take why things help put years different away again off went old number
request token cache block engine migrate copy worker scheduler prompt model
layer memory latency stream batch queue decode prefill instance agent transfer
server client router policy state stage abort resume pause source destination
""".split()

_FOREIGN = """
café naïve façade déjà vu résumé élève über Größe Straße Müller schön Fußball
señor mañana niño año corazón São Paulo Zürich Ångström smörgåsbord Ελληνικά
Привет мир спасибо 中文 你好 世界 模型 缓存 迁移 日本語 こんにちは 東京 한국어
안녕하세요 हिन्दी नमस्ते العربية مرحبا עברית
""".split()

_EMOJI = "🙂 😀 🚀 ✨ 🔥 👍 🎉 ❤️ 🌍 🤖 🧠 ⚡ ✅ ❌ 📦 🐍".split()
_PUNCT = [".", ",", "!", "?", ";", ":", "...", " -", " (ok)", " [x]", " {y}", "'s", '"']
_CODE = [
    "x = {n};",
    "if (a < b) {{ return {n}; }}",
    "def f(x): return x * {n}",
    "for i in range({n}):",
    "arr[{n}] += 1",
    "GET /v1/completions?id={n} HTTP/1.1",
    '{{"id": {n}, "ok": true}}',
    "0x{n:04x} & 0xff",
]


def make_corpus(num_sentences: int = _NUM_SENTENCES, seed: int = _CORPUS_SEED) -> Iterator[str]:
    """Yields `num_sentences` lines of mixed text; the same arguments give the
    same lines. Mostly English words, with digits, punctuation, code, accented
    Latin, other scripts and emoji so that byte-level merges span them."""
    rng = random.Random(seed)
    for _ in range(num_sentences):
        parts = []
        for _ in range(rng.randint(4, 16)):
            roll = rng.random()
            if roll < 0.70:
                parts.append(rng.choice(_WORDS))
            elif roll < 0.80:
                parts.append(rng.choice(_FOREIGN))
            elif roll < 0.88:
                parts.append(_number(rng))
            elif roll < 0.92:
                parts.append(rng.choice(_EMOJI))
            else:
                parts.append(rng.choice(_CODE).format(n=rng.randint(0, 4096)))
            if rng.random() < 0.1:
                parts[-1] += rng.choice(_PUNCT)
        parts[0] = parts[0][:1].upper() + parts[0][1:]
        yield " ".join(parts) + rng.choice([".", "!", "?", "\n", ""])


def _number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randint(0, 10 ** rng.randint(1, 7)))
    if kind == 1:
        return f"{rng.uniform(-1000, 1000):.{rng.randint(1, 4)}f}"
    if kind == 2:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return f"{rng.randint(0, 100)}%"


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE on `make_corpus()` with exactly `vocab_size`
    entries: ids 0-2 are `<pad>`, `<s>`, `</s>`; if the corpus yields fewer
    merges than wanted, the tail is filled with unused `<|reserved_N|>`
    special tokens. Encoding prepends `<s>`."""
    assert vocab_size >= MIN_VOCAB_SIZE, vocab_size
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    assert missing >= 0, missing
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def save_tokenizer(path: Path, vocab_size: int, model_max_length: int) -> None:
    """Trains the tokenizer and writes it to `path` as a
    `PreTrainedTokenizerFast` with bos/eos/pad and `CHAT_TEMPLATE`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(path))
    # transformers 5 records its own class name, which 4.x cannot load; the
    # generic name loads the same tokenizer in both.
    config_file = path / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
