"""A random-weight Llama built locally, for tests, demos and benchmarks.

`make_tiny_model` writes a Hugging Face model folder (config, float32
safetensors, tokenizer with a chat template) that vLLM loads like any other.
Weights are a pure function of the config: each tensor is drawn from its own
generator seeded by `(seed, tensor name)`, so the same config always gives
byte-identical weight files. `ensure_tiny_model` keeps one build per config in
a cache folder and is safe to call from several processes at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llumigrate.errors import ConfigError
from llumigrate.model.cache import build_once
from llumigrate.model.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    save_tokenizer,
)

# Bump when the files written for a given config change (weights, tokenizer
# corpus, file set): it is part of the digest, so old cache entries are not reused.
BUILD_VERSION = 1
MARKER_FILE = "llumigrate-tiny.json"
WEIGHTS_FILE = "model.safetensors"
CACHE_ENV = "LLUMIGRATE_MODEL_CACHE"
# Head sizes that vLLM's CPU attention backend (and the common GPU ones) accept.
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
MAX_VOCAB_SIZE = 65536
BYTES_PER_PARAM = 4  # float32 weights and KV cache


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape and seed of a tiny Llama. `intermediate_size=None` means
    `2 * hidden_size`. `initializer_range` is the std of every weight matrix;
    around 0.2 it keeps greedy output from collapsing onto one token."""

    num_layers: int = 2
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    vocab_size: int = 2048
    max_position_embeddings: int = 16384
    initializer_range: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 2 * self.hidden_size)
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("vocab_size", self.vocab_size, MIN_VOCAB_SIZE, MAX_VOCAB_SIZE)
        _check_int("max_position_embeddings", self.max_position_embeddings, 16)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
            )
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ConfigError(
                f"head_dim = hidden_size / num_heads = {self.head_dim}; "
                f"allowed: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        r = self.initializer_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf:
            raise ConfigError(f"initializer_range must be a positive finite number, got {r!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers (float32)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BYTES_PER_PARAM

    def num_params(self) -> int:
        h, v, i, kv = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_kv_heads
        assert i is not None
        per_layer = 2 * h * h + 2 * h * kv * self.head_dim + 3 * h * i + 2 * h
        return 2 * v * h + h + self.num_layers * per_layer

    def digest(self) -> str:
        """12 hex digits naming this config (and `BUILD_VERSION`); stable across runs."""
        blob = json.dumps({"build": BUILD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def describe(self) -> str:
        return (
            f"tiny llama: {self.num_layers} layers, hidden {self.hidden_size}, "
            f"{self.num_heads} heads ({self.num_kv_heads} kv, head_dim {self.head_dim}), "
            f"vocab {self.vocab_size}, {self.num_params() / 1e6:.2f}M params, "
            f"KV {self.kv_bytes_per_token()} B/token (float32)"
        )


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{name}={value} out of range; allowed: {allowed}")


def make_tiny_model(path: str | Path, config: TinyModelConfig | None = None) -> Path:
    """Builds the model folder at `path` and returns it.

    The folder is assembled in a temporary sibling and renamed into place, so
    `path` either holds a complete model (with `MARKER_FILE`) or is untouched.
    An existing `path` must be empty or an earlier tiny model (it is replaced);
    anything else raises `ConfigError`.
    """
    config = config or TinyModelConfig()
    target = Path(path).expanduser().absolute()
    if target.exists() and not _replaceable(target):
        raise ConfigError(f"{target} exists and is not a tiny model folder; refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_model(tmp, config)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_tiny_model(
    path: str | Path | None = None, config: TinyModelConfig | None = None
) -> Path:
    """Returns a complete tiny model folder for `config`, building it if needed.

    Without `path`, the folder is `<cache>/tiny-<digest>`, where `<cache>` is
    `$LLUMIGRATE_MODEL_CACHE` or `~/.cache/llumigrate`. Concurrent callers
    serialise on a `fcntl` lock beside the folder; one builds, the others reuse.
    A folder holding a tiny model of another config raises `ConfigError`.
    """
    config = config or TinyModelConfig()
    if path is None:
        target = default_cache_dir() / f"tiny-{config.digest()}"
    else:
        target = Path(path).expanduser().absolute()
    return build_once(target, lambda: _is_complete(target, config), lambda: make_tiny_model(target, config))


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/llumigrate").expanduser().absolute()


def read_marker(path: str | Path) -> dict | None:
    """The build record of a complete tiny model folder, or None."""
    try:
        return json.loads((Path(path) / MARKER_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _is_complete(path: Path, config: TinyModelConfig) -> bool:
    marker = read_marker(path)
    if marker is None:
        return False
    if marker.get("digest") != config.digest():
        raise ConfigError(
            f"{path} holds a tiny model of another config ({marker.get('config')}); "
            f"wanted {dataclasses.asdict(config)}"
        )
    return True


def _replaceable(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or read_marker(path) is not None)


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists() or not any(target.iterdir()):
        os.replace(tmp, target)  # an empty directory is replaced atomically
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "model")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_model(path: Path, config: TinyModelConfig) -> None:
    from safetensors.torch import save_file

    hf_config = _hf_config(config)
    hf_config.save_pretrained(str(path))
    _generation_config().save_pretrained(str(path))
    save_file(_make_weights(config, hf_config), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    save_tokenizer(path, config.vocab_size, config.max_position_embeddings)
    os.chmod(path, 0o755)  # mkdtemp (and safetensors for its file) use owner-only modes
    for child in path.iterdir():
        os.chmod(child, 0o644)
    marker = {
        "build": BUILD_VERSION,
        "digest": config.digest(),
        "config": dataclasses.asdict(config),
    }
    # NOTE: the marker is written last; its presence means every other file is there.
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    os.chmod(path / MARKER_FILE, 0o644)


def _hf_config(config: TinyModelConfig):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    assert config.intermediate_size is not None  # resolved in __post_init__
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        dtype="float32",
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )


def _generation_config():  # -> transformers.GenerationConfig
    from transformers import GenerationConfig

    return GenerationConfig(
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )


def _make_weights(config: TinyModelConfig, hf_config) -> dict:
    """Norm weights are 1; every other tensor is N(0, initializer_range²),
    drawn from a generator seeded by (seed, name) so no tensor depends on the
    order in which transformers lists them."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(hf_config).state_dict().items()}
    assert sum(math.prod(s) for s in shapes.values()) == config.num_params(), shapes
    weights = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.float32)
            continue
        key = hashlib.sha256(f"{config.seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        weights[name] = torch.empty(shape, dtype=torch.float32).normal_(
            0.0, config.initializer_range, generator=gen
        )
    return weights
