"""Build a tiny random-weight Llama (plus tokenizer) that vLLM can load."""

from __future__ import annotations

import argparse
import time

from llumigrate.errors import ConfigError
from llumigrate.model.tiny import TinyModelConfig, make_tiny_model

# flag -> TinyModelConfig field
_FLAGS = {
    "--layers": "num_layers",
    "--hidden-size": "hidden_size",
    "--heads": "num_heads",
    "--kv-heads": "num_kv_heads",
    "--intermediate-size": "intermediate_size",
    "--vocab-size": "vocab_size",
    "--max-positions": "max_position_embeddings",
    "--seed": "seed",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder to write (must be absent, empty, or a tiny model)")
    defaults = TinyModelConfig()
    for flag, field in _FLAGS.items():
        default = getattr(defaults, field)
        note = "2 x hidden size" if field == "intermediate_size" else default
        parser.add_argument(flag, dest=field, type=int, default=None, help=f"default: {note}")
    parser.add_argument(
        "--init-range",
        dest="initializer_range",
        type=float,
        default=None,
        help=f"std of the random weights (default: {defaults.initializer_range})",
    )


def run(args: argparse.Namespace) -> int:
    fields = [*_FLAGS.values(), "initializer_range"]
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        config = TinyModelConfig(**overrides)
        start = time.perf_counter()
        path = make_tiny_model(args.dir, config)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(path)
    print(f"{config.describe()}; built in {time.perf_counter() - start:.1f} s")
    return 0
