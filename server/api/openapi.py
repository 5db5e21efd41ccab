"""What /openapi.json says each route answers: the statuses the server really
returns, each error with the envelope's schema, and never FastAPI's 422
(validation errors are 400s here). Clients and fuzzers (schemathesis) check
responses against it."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api.protocol import ErrorResponse

_MEANING = {
    400: "an invalid field, named in `error.param`; a body that is not a JSON object; a request that can "
         "never fit (`n` or prompts beyond the queue)",
    401: "missing or wrong API key (`--api-key`); carries `WWW-Authenticate: Bearer`",
    404: "unknown model (`error.param` is `model`) or route",
    413: "request body over `--max-body-bytes`",
    429: "the waiting queue is full right now (`--max-queued-requests`); carries `Retry-After`",
    500: "the request failed inside the engine (it failed alone; others went on)",
    503: "the model is loading, the server is draining, or the engine died",
}

# route kind -> the error statuses it can answer
GENERATION = (400, 401, 404, 413, 429, 500, 503)
TOKENIZER = (400, 401, 404, 413, 503)
MODELS = (401,)
MODEL = (401, 404)


def errors(statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering these error statuses."""
    return {s: {"model": ErrorResponse, "description": _MEANING[s]} for s in statuses}


def install(app: FastAPI) -> None:
    """Replaces ``app.openapi`` with one that leaves out the 422 FastAPI
    adds to every route with a body, and its schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
