"""OpenAI-compatible HTTP frontend and Prometheus metrics, over any `GenerateBackend`."""

from __future__ import annotations

from llumigrate.frontend.app import build_app
from llumigrate.frontend.backend import BackendRejected, GenerateBackend, GenerateHandle
from llumigrate.frontend.metrics import Metrics
from llumigrate.frontend.server import serve_http

__all__ = ["BackendRejected", "GenerateBackend", "GenerateHandle", "Metrics", "build_app", "serve_http"]
