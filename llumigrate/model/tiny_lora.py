"""A random LoRA adapter for a local Llama (e.g. the built-in tiny model),
built without `peft`: a PEFT-format folder (`adapter_config.json` +
`adapter_model.safetensors`) that vLLM loads with `--enable-lora
--lora-modules NAME=PATH` or `/v1/load_lora_adapter`.

Every attention and MLP projection of every layer gets `lora_A` [r, in] and
`lora_B` [out, r], each drawn from its own generator seeded by `(seed, tensor
name)`. B is non-zero (PEFT initialises it to zero; a trained adapter's is
not), so the adapter changes the model's outputs. The same base config and
adapter config always give byte-identical files; `ensure_tiny_lora` keeps one
build per pair in the model cache and is safe to call from several processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llumigrate.errors import ConfigError
from llumigrate.model.cache import build_once
from llumigrate.model.tiny import default_cache_dir

BUILD_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MARKER_FILE = "llumigrate-lora.json"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TinyLoraConfig:
    """Rank, scale and seed of the adapter. `lora_alpha = rank` (PEFT's
    scaling alpha / r is 1); `std` is the std of every A and B entry."""

    rank: int = 8
    std: float = 0.2
    seed: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.std, bool) or not isinstance(self.std, (int, float)) or not self.std > 0:
            raise ConfigError(f"std must be a positive number, got {self.std!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")


def lora_shapes(hf_config: dict, rank: int) -> dict[str, tuple[int, int]]:
    """PEFT tensor name -> shape of each LoRA matrix for a Llama `config.json`."""
    h, inter, layers = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["num_hidden_layers"]
    head_dim = hf_config.get("head_dim") or h // hf_config["num_attention_heads"]
    q, kv = hf_config["num_attention_heads"] * head_dim, hf_config.get("num_key_value_heads", 1) * head_dim
    io = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
          "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
          "mlp.down_proj": (inter, h)}
    shapes = {}
    for i in range(layers):
        for module, (d_in, d_out) in io.items():
            base = f"base_model.model.model.layers.{i}.{module}"
            shapes[f"{base}.lora_A.weight"] = (rank, d_in)
            shapes[f"{base}.lora_B.weight"] = (d_out, rank)
    return shapes


def make_tiny_lora(model_dir: str | Path, path: str | Path, config: TinyLoraConfig | None = None) -> Path:
    """Writes the adapter for the model at `model_dir` into `path` (assembled
    in a temporary sibling, then renamed into place) and returns `path`."""
    config = config or TinyLoraConfig()
    target = Path(path).expanduser().absolute()
    if target.exists():
        if read_marker(target) is None:
            raise ConfigError(f"{target} exists and is not a tiny LoRA folder; refusing to replace it")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_adapter(tmp, Path(model_dir), config)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_tiny_lora(model_dir: str | Path, config: TinyLoraConfig | None = None,
                     path: str | Path | None = None) -> Path:
    """A complete adapter folder for `model_dir` and `config`, built if
    needed. Without `path` it is `<model cache>/lora-<digest>`, the digest
    naming the base model's `config.json` and `config`."""
    config = config or TinyLoraConfig()
    digest = _digest(Path(model_dir), config)
    target = Path(path).expanduser().absolute() if path else default_cache_dir() / f"lora-{digest}"
    return build_once(target, lambda: _is_complete(target, digest),
                      lambda: make_tiny_lora(model_dir, target, config))


def read_marker(path: str | Path) -> dict | None:
    try:
        return json.loads((Path(path) / MARKER_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _base_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{model_dir} has no config.json: not a model folder") from None


def _digest(model_dir: Path, config: TinyLoraConfig) -> str:
    blob = json.dumps({"build": BUILD_VERSION, "base": _base_config(model_dir),
                       **dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _is_complete(path: Path, digest: str) -> bool:
    marker = read_marker(path)
    if marker is None:
        return False
    if marker.get("digest") != digest:
        raise ConfigError(f"{path} holds a LoRA adapter of another base model or config")
    return True


def _write_adapter(path: Path, model_dir: Path, config: TinyLoraConfig) -> None:
    import torch
    from safetensors.torch import save_file

    base = _base_config(model_dir)
    if base.get("model_type") != "llama":
        raise ConfigError(f"{model_dir} is a {base.get('model_type')!r} model; only llama is supported")
    weights = {}
    for name, shape in lora_shapes(base, config.rank).items():
        key = hashlib.sha256(f"{config.seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        weights[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, config.std, generator=gen)
    save_file(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model_dir.name,
               "r": config.rank, "lora_alpha": config.rank, "lora_dropout": 0.0, "bias": "none",
               "target_modules": list(TARGET_MODULES), "fan_in_fan_out": False, "inference_mode": True}
    (path / CONFIG_FILE).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")
    os.chmod(path, 0o755)  # mkdtemp and safetensors use owner-only modes
    for child in path.iterdir():
        os.chmod(child, 0o644)
    marker = {"build": BUILD_VERSION, "digest": _digest(model_dir, config), "config": dataclasses.asdict(config)}
    # NOTE: the marker is written last; its presence means every other file is there.
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    os.chmod(path / MARKER_FILE, 0o644)
