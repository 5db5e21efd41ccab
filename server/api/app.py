"""The FastAPI application: routes, authentication, limits and the error
envelope. Never imports torch: the engine arrives as an object.

Every error is ``{"error": {"message", "type", "param", "code"}}``: invalid
fields 400 (FastAPI's 422 replaced) naming ``param``, unknown model 404, bad
or missing key 401 (with ``WWW-Authenticate: Bearer``), oversized body 413,
full queue 429 with ``Retry-After``, loading/draining/dead engine 503. These
are the statuses /openapi.json documents (``openapi.py``). A path with a
trailing slash is not redirected (a redirect would name the client's own
Host header): it is a 404 like any unknown path.

Unless ``ServerConfig.playground`` is off, ``/`` serves the playground: one
static page (``static/``: HTML, CSS, JS; no build step, nothing fetched from
elsewhere) that chats with the model and draws the denoising live from the
``include_denoising`` stream.
"""
from __future__ import annotations

import hmac
import re
import logging
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.api import openapi
from server.api.drain import Drain
from server.api.errors import APIError, error_response
from server.api.loglikelihood import LoglikelihoodRequest, LoglikelihoodServing
from server.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.api.serving import OpenAIServing

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# name -> media type of the playground's files under /playground/
_PLAYGROUND_ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page loads only its own files and talks only to this server.
_PLAYGROUND_HEADERS = {
    "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
}


_FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_SCALAR_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_of(loc: tuple) -> str | None:
    """A validation error's location as an OpenAI ``param``
    (``messages[0].content``), cut before pydantic's union-member tags
    (``str``, ``list[int]``, ``TextPart``, ...)."""
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x == "body" and not parts:
            continue
        elif _FIELD_NAME.match(x) and x not in _SCALAR_TAGS:
            parts.append(("." if parts else "") + x)
        else:
            break
    return "".join(parts) or None


_NOT_AN_OBJECT = "the request body must be a JSON object (send it with Content-Type: application/json)"


def validation_error(err: dict) -> APIError:
    """A 400 for pydantic's first error: the field it names as ``param``,
    the message without pydantic's "Value error, " prefix."""
    loc, kind = tuple(err.get("loc", ())), err.get("type")
    if kind == "json_invalid":
        return APIError.bad_request(f"invalid JSON body: {err.get('msg')}; {_NOT_AN_OBJECT}", "body")
    if loc == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type", "missing"):
        return APIError.bad_request(_NOT_AN_OBJECT, "body")
    if kind == "value_error" and "error" in err.get("ctx", {}):
        return APIError.bad_request(str(err["ctx"]["error"]))  # our own "field: message"
    param = _param_of(loc)
    msg = err.get("msg", "invalid value")
    return APIError.bad_request(f"{param}: {msg}" if param else msg, param)


class ServerState:
    """What the routes share: the engine, config, metrics, and drain state."""

    def __init__(self, engine, config, model_name: str):
        self.engine = engine  # AsyncEngine
        self.config = config  # ServerConfig
        self.model_name = model_name
        self.draining = False
        self.in_flight = 0  # generation requests being answered
        self.drain = Drain()  # those requests, and how to end them at the drain deadline
        self.serving = OpenAIServing(engine, config, model_name, self.drain)
        self.loglikelihood = LoglikelihoodServing(engine, model_name, self.drain)


class BodyLimit:
    """Pure ASGI middleware: refuses request bodies over ``max_bytes`` with
    413, by Content-Length up front, and by reading chunked bodies (up to the
    limit) before the app sees them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body exceeds {self.max_bytes} bytes", "invalid_request_error",
                                 None, "body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # chunked: buffer what the limit allows, then replay it
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


class RequestId:
    """Pure ASGI middleware: every HTTP response carries ``X-Request-Id``,
    the client's own or a new one. (Starlette's ``@app.middleware("http")``
    would pipe every streamed chunk through an extra task and memory stream.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = next((v for k, v in scope["headers"] if k == b"x-request-id" and v), None) or uuid.uuid4().hex.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid)]}
            await send(message)

        return await self.app(scope, receive, send_with_id)


class InFlight:
    """Pure ASGI middleware counting generation requests from arrival until
    their response (streamed or not) has ended by any path, so draining waits
    for exactly them, and knows which of them wait on their client."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/loglikelihood")

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.ROUTES:
            return await self.app(scope, receive, send)
        drain = self.state.drain
        entry, receive, send = drain.track(receive, send)
        drain.requests.add(entry)
        self.state.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1
            drain.requests.discard(entry)


def build_app(state: ServerState, metrics) -> FastAPI:
    app = FastAPI(title="llada-serve", version=__version__,
                  description="OpenAI-compatible server for masked diffusion language models (LLaDA).")
    app.router.redirect_slashes = False
    openapi.install(app)
    app.state.server = state
    cfg = state.config

    # -- errors ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return validation_error(e.errors()[0]).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", "server_error", None, "internal_error")

    # -- auth and availability ------------------------------------------------------------------
    async def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def check_available() -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", "server_error", None, "draining",
                           {"Retry-After": "5"})
        if state.engine.is_dead:
            raise APIError(503, "the engine has died; the server is restarting", "server_error", None, "unavailable")
        if not state.engine.is_ready:
            raise APIError(503, "the model is still loading", "server_error", None, "loading", {"Retry-After": "5"})

    async def generation(kind: str, body, request: Request):
        check_available()
        result = await state.serving.run(kind, body, request)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    auth = [Depends(check_key)]

    def check_model(model: str | None) -> None:
        if model is not None and model != state.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "not_found_error", "model",
                           "model_not_found")

    @app.post("/v1/completions", dependencies=auth, responses=openapi.errors(openapi.GENERATION))
    async def completions(body: CompletionRequest, request: Request):
        if body.model_extra:
            logger.debug("ignoring unknown fields %s", sorted(body.model_extra))
        return await generation("completion", body, request)

    @app.post("/v1/chat/completions", dependencies=auth, responses=openapi.errors(openapi.GENERATION))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model_extra:
            logger.debug("ignoring unknown fields %s", sorted(body.model_extra))
        return await generation("chat", body, request)

    @app.post("/v1/loglikelihood", dependencies=auth, responses=openapi.errors(openapi.GENERATION))
    async def loglikelihood(body: LoglikelihoodRequest, request: Request):
        check_available()
        return JSONResponse(await state.loglikelihood.run(body, request))

    def model_card() -> dict:
        card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "llada-serve",
                "root": state.model_name, "max_model_len": None, "bundled_demo": state.config.bundled_demo}
        # Once loaded: the architecture, ids and decoding defaults served.
        return card | (state.serving.model_description() if state.engine.facts else {})

    @app.get("/v1/models", dependencies=auth, responses=openapi.errors(openapi.MODELS))
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth, responses=openapi.errors(openapi.MODEL))
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/tokenize", dependencies=auth, responses=openapi.errors(openapi.TOKENIZER))
    async def tokenize(body: TokenizeRequest):
        check_available()
        serving = state.serving
        check_model(body.model)
        if body.messages is not None:
            ids = serving.chat_prompt(ChatCompletionRequest(messages=body.messages))
        else:
            ids = serving.tokenizer.encode(body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_model_len}

    @app.post("/detokenize", dependencies=auth, responses=openapi.errors(openapi.TOKENIZER))
    async def detokenize(body: DetokenizeRequest):
        check_available()
        check_model(body.model)
        vocab = state.serving.facts.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError.bad_request(f"tokens: id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": state.serving.tokenizer.decode(body.tokens)}

    @app.get("/health", responses={503: {"description": "loading, draining, or the engine died"}})
    async def health():
        if state.draining or state.engine.is_dead or not state.engine.is_ready:
            why = "draining" if state.draining else ("dead" if state.engine.is_dead else "loading")
            return JSONResponse({"status": why}, status_code=503)
        return {"status": "ok"}

    @app.get("/live")
    async def live():
        return {"status": "alive"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if cfg.playground:
        @app.get("/", include_in_schema=False)
        async def playground():
            return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                                headers=_PLAYGROUND_HEADERS)

        @app.get("/playground/{name}", include_in_schema=False)
        async def playground_asset(name: str):
            if name not in _PLAYGROUND_ASSETS:
                raise StarletteHTTPException(404, "Not Found")
            return FileResponse(STATIC / name, media_type=_PLAYGROUND_ASSETS[name], headers=_PLAYGROUND_HEADERS)

    return RequestId(BodyLimit(InFlight(app, state), cfg.max_body_bytes))
