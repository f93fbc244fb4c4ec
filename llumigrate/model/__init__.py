"""Models llumigrate builds for itself: a tiny random-weight Llama for tests,
demos and benchmarks (nothing is downloaded)."""

from __future__ import annotations

from llumigrate.model.tiny import TinyModelConfig, ensure_tiny_model, make_tiny_model

__all__ = ["TinyModelConfig", "ensure_tiny_model", "make_tiny_model"]
