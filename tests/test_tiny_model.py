"""The tiny model: deterministic build, tokenizer, cache, and one real vLLM load."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llumigrate.cli.main import main as cli_main
from llumigrate.errors import ConfigError
from llumigrate.model import tiny
from llumigrate.model.tiny import TinyModelConfig, ensure_tiny_model, make_tiny_model
from llumigrate.model.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

TEXTS = [
    "Hello, world! The request 42 moved at 12:30.",
    "  leading spaces\tand tabs\nnew lines  ",
    "café naïve über Größe — 中文 你好世界 🙂🚀 ❤️ Привет",
    "rare bytes: \x00\x7f ÿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again")
    other = make_tiny_model(tmp_path / "other", TinyModelConfig(seed=1))
    weights = tiny.WEIGHTS_FILE
    assert _sha256(again / weights) == _sha256(model_dir / weights)
    assert _sha256(again / "tokenizer.json") == _sha256(model_dir / "tokenizer.json")
    assert _sha256(other / weights) != _sha256(model_dir / weights)
    assert _sha256(other / "tokenizer.json") == _sha256(model_dir / "tokenizer.json")


def test_weights_load_in_transformers_and_greedy_is_diverse(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == TinyModelConfig().num_params()
    ids = tok("The request token cache", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :]
    assert len(set(out.tolist())) >= 8, out.tolist()


def test_tokenizer_roundtrip(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.encode("the request token")) < len("the request token")  # merges exist


def test_chat_template(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>system: Be brief.\nuser: Hi 🙂\nassistant: "
    no_prompt = tok.apply_chat_template(messages, tokenize=False)
    assert no_prompt == "<s>system: Be brief.\nuser: Hi 🙂\n"
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tok.bos_token_id) == 1


def test_vocab_size_matches(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    assert len(AutoTokenizer.from_pretrained(model_dir)) == config["vocab_size"] == 2048
    # Too few merges in the corpus for 8192: the tail is reserved tokens.
    for size in (MIN_VOCAB_SIZE, 300, 8192):
        tok = train_tokenizer(size)
        assert tok.get_vocab_size(with_added_tokens=True) == size
        assert len(set(tok.get_vocab().values())) == size
        assert max(tok.get_vocab().values()) == size - 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_layers": 0}, "num_layers=0"),
        ({"hidden_size": 130}, "multiple of num_heads"),
        (
            {"hidden_size": 64, "num_heads": 4},
            "head_dim = hidden_size / num_heads = 16; allowed: 32",
        ),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"vocab_size": 100}, f"allowed: {MIN_VOCAB_SIZE}.."),
        ({"max_position_embeddings": 8}, "allowed: >= 16"),
        ({"initializer_range": 0.0}, "positive finite"),
        ({"initializer_range": float("nan")}, "positive finite"),
        ({"seed": -1}, "seed=-1"),
        ({"num_heads": 4.0}, "must be an int"),
        ({"num_layers": True}, "must be an int"),
    ],
)
def test_config_validation(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        TinyModelConfig(**kwargs)


def test_config_defaults_and_digest() -> None:
    config = TinyModelConfig()
    assert config.intermediate_size == 256 and config.head_dim == 32
    assert config.kv_bytes_per_token() == 2 * 2 * 2 * 32 * 4
    assert config.digest() == TinyModelConfig(intermediate_size=256).digest()
    assert config.digest() != TinyModelConfig(seed=1).digest()
    assert len(config.digest()) == 12
    wide = TinyModelConfig(num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=8)
    assert wide.kv_bytes_per_token() == 32 * 1024


def test_ensure_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path))
    calls = []
    real_make = tiny.make_tiny_model
    monkeypatch.setattr(tiny, "make_tiny_model", lambda *a: calls.append(a) or real_make(*a))
    config = TinyModelConfig(seed=7)
    results: list[Path] = []
    # NOTE: flock locks belong to open file descriptions, so threads that each
    # open the lock file exclude each other just as processes do.
    threads = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(config=config)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / f"tiny-{config.digest()}"] * 3
    assert tiny.read_marker(results[0])["digest"] == config.digest()
    assert ensure_tiny_model(config=config) == results[0] and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        results[0].name
    ]


def test_ensure_refuses_other_config(model_dir: Path) -> None:
    assert ensure_tiny_model(model_dir) == model_dir
    with pytest.raises(ConfigError, match="another config"):
        ensure_tiny_model(model_dir, TinyModelConfig(seed=3))


def test_make_refuses_foreign_dir_and_leaves_nothing_on_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a tiny model"):
        make_tiny_model(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    def boom(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "save_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_tiny_model(tmp_path / "crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_make_replaces_an_earlier_tiny_model(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "m", TinyModelConfig(seed=1))
    second = make_tiny_model(tmp_path / "m", TinyModelConfig(seed=2))
    assert first == second
    assert tiny.read_marker(second)["config"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "cli"
    assert cli_main(["make-tiny-model", str(out_dir), "--layers", "1", "--vocab-size", "512"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(out_dir)
    assert "1 layers" in lines[1] and "KV 512 B/token" in lines[1]
    assert tiny.read_marker(out_dir)["config"]["vocab_size"] == 512
    assert cli_main(["make-tiny-model", str(tmp_path / "bad"), "--heads", "3"]) == 2
    assert "error:" in capsys.readouterr().out


# Runs in its own interpreter: vLLM spawns an EngineCore and a worker process,
# and keeping its import side effects out of the test process is cheaper than
# cleaning up after them.
_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
start = time.perf_counter()
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024,
          kv_cache_memory_bytes=256 * 2**20, seed=0)
engine_s = time.perf_counter() - start
params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
runs = [llm.generate(["The request token cache"], params, use_tqdm=False)[0] for _ in range(2)]
print("RESULT " + json.dumps({
    "engine_s": engine_s,
    "prompt": runs[0].prompt_token_ids,
    "outputs": [list(r.outputs[0].token_ids) for r in runs],
}), flush=True)
"""


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_vllm_loads_and_greedy_is_diverse_and_repeatable(model_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, str(model_dir)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    first, second = result["outputs"]
    assert len(first) == 32 and first == second
    assert len(set(first)) >= 8, first
    # vLLM runs the same float32 weights: its first greedy tokens agree with transformers'.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = torch.tensor([result["prompt"]])
    hf = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :]
    assert hf.tolist() == first[:8]
