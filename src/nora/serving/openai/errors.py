"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

from nora.serving.sampling import ParamError


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param=None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.retry_after = retry_after

    @classmethod
    def bad(cls, e: ParamError) -> APIError:
        """The 400 of a field the protocol (or SamplingParams) refused, naming it."""
        return cls(400, e.msg, param=e.param)

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.status,
        }
        headers = None
        if self.retry_after is not None:
            headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)
