"""Errors in OpenAI's format, with the right HTTP status."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "request_cancelled",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_grpc(error: grpc.aio.AioRpcError, leg: str) -> APIError:
    """Map a worker's gRPC status to what the client should see."""
    code, detail = error.code(), error.details() or str(error.code())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, detail)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return APIError(429, f"the {leg} workers are at capacity: {detail}", retry_after=1)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, f"the {leg} worker timed out: {detail}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return APIError(503, f"the {leg} worker is unavailable: {detail}")
    if code == grpc.StatusCode.CANCELLED:
        return APIError(499, "the request was cancelled")
    return APIError(502, f"the {leg} worker failed: {detail}")
