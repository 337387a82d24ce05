"""The dispatcher's error answers, in the OpenAI API's error shape."""

from __future__ import annotations

from starlette.responses import JSONResponse


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "code": self.code}},
                            status_code=self.status, headers=headers)
