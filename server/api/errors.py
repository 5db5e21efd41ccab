"""The OpenAI error envelope and the mapping from failures to statuses.

An error body is written with every non-ASCII character escaped, so a
message quoting what the client sent (a model name, a field) can always be
written, whatever that held."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


class ErrorJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> "APIError":
        """A 400; ``param`` defaults to the field a 'field: message' text names."""
        if param is None:
            m = _FIELD_PREFIX.match(message)
            param = m.group(1) if m else None
        return cls(400, message, "invalid_request_error", param, "invalid_value")

    @classmethod
    def refused(cls, error, names: dict[str, str] | None = None) -> "APIError":
        """A 400 for a setting the engine or sampler refused (a ParamError:
        its ``field`` in their names, its ``message``), naming the field as
        the client sent it (``names``: theirs -> the client's)."""
        field = (names or {}).get(error.field, error.field)
        return cls.bad_request(f"{field}: {error.message}", field)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return ErrorJSON(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return APIError(status, message, type_, param, code, headers).response()
