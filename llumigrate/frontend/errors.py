"""HTTP errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`,
with the same types and codes vLLM's server uses."""

from __future__ import annotations

from http import HTTPStatus


class APIError(Exception):
    """A request the frontend answers with an error body instead of a result."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST,
                 param: str | None = None, err_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.err_type = err_type or _DEFAULT_TYPES.get(self.status, HTTPStatus(self.status).phrase)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.status}}


_DEFAULT_TYPES = {
    HTTPStatus.BAD_REQUEST: "BadRequestError",
    HTTPStatus.UNAUTHORIZED: "Unauthorized",
    HTTPStatus.NOT_FOUND: "NotFoundError",
    HTTPStatus.INTERNAL_SERVER_ERROR: "InternalServerError",
    HTTPStatus.SERVICE_UNAVAILABLE: "ServiceUnavailableError",
}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, HTTPStatus.BAD_REQUEST, param)


def unsupported(feature: str, param: str) -> APIError:
    return bad_request(f"{feature} is not supported by llumigrate yet", param)
