"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics.

With `api_key` set, every /v1/* request needs `Authorization: Bearer <key>`
(vLLM's --api-key semantics: /health and /metrics stay open).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from http import HTTPStatus

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llumigrate.frontend.backend import GenerateBackend
from llumigrate.frontend.chat import create_chat_completion
from llumigrate.frontend.completions import create_completion
from llumigrate.frontend.errors import APIError, bad_request
from llumigrate.frontend.metrics import Metrics
from llumigrate.frontend.protocol import validation_error
from llumigrate.frontend.serving import Service
from llumigrate.frontend.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)
GUARDED_PREFIX = "/v1"


def build_app(backend: GenerateBackend, metrics: Metrics | None = None, *, api_key: str | None = None,
              tokenizer: ModelTokenizer | None = None) -> FastAPI:
    """An app serving `backend`. The tokenizer is loaded from
    `backend.model_path` unless given; `metrics` (a fresh one if None) is
    exposed on /metrics and fed with per-request figures."""
    metrics = metrics or Metrics()
    svc = Service(backend, metrics, tokenizer or ModelTokenizer(backend.model_path))
    app = FastAPI(title="llumigrate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    _add_errors(app)
    if api_key:
        _add_auth(app, api_key)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(svc, await _json(request), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(svc, await _json(request), request)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": backend.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "llumigrate", "root": backend.model_path, "parent": None,
                "max_model_len": backend.max_model_len, "permission": []}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        ok = backend.healthy()
        return Response(status_code=HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    @app.get("/metrics")
    async def prometheus() -> Response:
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    return app


async def _json(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def _add_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)


def _add_auth(app: FastAPI, api_key: str) -> None:
    expected = hashlib.sha256(api_key.encode()).digest()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):  # noqa: ANN001, ANN202
        if request.method != "OPTIONS" and request.url.path.startswith(GUARDED_PREFIX):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
                return JSONResponse({"error": "Unauthorized"}, status_code=HTTPStatus.UNAUTHORIZED)
        return await call_next(request)
