"""Connection limits under the HTTP parser: what a production server
enforces before a request reaches the app.

uvicorn's httptools protocol (the fast parser of ``uvicorn[standard]``) has
no header limits and no time limit on a request that is still arriving; its
keep-alive timer runs only between requests. ``limited_protocol`` returns a
subclass that adds, per connection:

- header size: the request line and headers over ``max_header_bytes`` get a
  431 and the connection closes. Bytes are counted as they arrive, so a huge
  header is cut after about that much is read (httptools would otherwise
  gather it whole, in time quadratic in its length);
- header count: more than ``max_headers`` fields get a 431;
- header time: a request whose headers are not complete ``header_timeout``
  seconds after its first byte (or after the connection opened) gets a 408
  (a connection that never sent a byte is just closed);
- body time: a body not complete ``body_timeout`` seconds after its headers
  gets a 408 and the app sees a disconnect;
- open connections: a request on a connection beyond ``max_connections``
  gets a 503 and the connection closes;
- upgrades: the app serves no WebSocket, so ``Upgrade`` is ignored; the
  parser cannot read a body after an upgrade request's headers, so such a
  request that has a body gets a 400, and every upgrade request's
  connection closes after its answer.

Refusals are the API's error envelope and say ``Connection: close``. After
one, the connection reads and drops what the client still sends for a short
while before closing, so the client reads the answer rather than a reset.
"""
from __future__ import annotations

import asyncio
import json
import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.api.errors import ErrorJSON
from server.config import ServerConfig

LINGER_S = 1.0  # how long a refused connection drains what the client still sends


def _envelope(message: str, code: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _raw_response(status: int, reason: str, body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode("ascii")
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + data


def _closing_app(status: int, message: str, code: str, type_: str, headers: dict[str, str] | None = None):
    """An ASGI app answering every request with this error and closing."""
    return ErrorJSON(_envelope(message, code, type_), status_code=status,
                     headers={"Connection": "close", **(headers or {})})


class _Refused(Exception):
    """Raised from a parser callback after a refusal, to stop the parser."""


class LimitedHttpProtocol(HttpToolsProtocol):
    limits = ServerConfig()  # the fields this class reads: max_header_bytes, max_headers, header_timeout, ...

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True  # between a message's end (or the connection's start) and its headers
        self._header_bytes = 0  # bytes received while awaiting headers
        self._num_headers = 0
        self._in_message = False  # a request's first byte arrived, its last has not
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered with an error: drop what arrives, then close
        self._over_capacity = _closing_app(503, "the server has too many open connections (--max-connections); "
                                           "retry later", "too_many_connections", "server_error",
                                           {"Retry-After": "1"})
        self._upgrade_with_body = _closing_app(
            400, "Upgrade: this server speaks no other protocol, and a request asking for one cannot carry a body",
            "upgrade_not_supported", "invalid_request_error")

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._awaiting_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # served as plain HTTP (on_headers_complete), then the connection closes
        except httptools.HttpParserError:
            if self._refused:
                return
            if self._header_bytes > self.limits.max_header_bytes:
                return self._refuse_header_bytes()
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        if self._refused:
            return
        if self._awaiting_headers:
            if self._header_bytes > self.limits.max_header_bytes:
                return self._refuse_header_bytes()
            if self._header_timer is None and self._in_message:
                self._header_timer = self.loop.call_later(self.limits.header_timeout, self._on_header_timeout)
        elif self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._on_body_timeout)

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        self._num_headers = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        if self._num_headers > self.limits.max_headers:
            self._refuse(431, "Request Header Fields Too Large",
                         f"the request has more than {self.limits.max_headers} header fields", "too_many_headers")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse_header_bytes()
            raise _Refused
        self._awaiting_headers = False
        self._header_bytes = 0
        upgrade = self.parser.should_upgrade()
        app = self.app
        if len(self.connections) > self.limits.max_connections:
            self.app = self._over_capacity
        elif upgrade and any(k == b"transfer-encoding" or (k == b"content-length" and v.strip() not in (b"", b"0"))
                             for k, v in self.headers):
            self.app = self._upgrade_with_body
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        if upgrade:  # the parser reads nothing after an upgrade request
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_headers, self._in_message = True, False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # -- refusals -----------------------------------------------------------------------
    def _refuse_header_bytes(self) -> None:
        self._refuse(431, "Request Header Fields Too Large",
                     f"the request line and headers exceed {self.limits.max_header_bytes} bytes", "headers_too_large")

    def _refuse(self, status: int, reason: str, message: str, code: str,
                type_: str = "invalid_request_error") -> None:
        """Answers ``status`` (unless a response already started), then drops
        what still arrives for LINGER_S before closing."""
        if self._refused:
            return
        self._refused = True
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() now says so, its send() is dropped
            cycle.message_event.set()
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_raw_response(status, reason, _envelope(message, code, type_)))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def shutdown(self) -> None:
        """Called by uvicorn as the server stops: a request still arriving
        gets a 503, a response its client stopped reading is cut, and the
        rest closes after its current response (uvicorn's way)."""
        if self._refused:
            return
        if self._in_message:
            self._refuse(503, "Service Unavailable", "the server is shutting down", "shutdown", "server_error")
        elif self.flow is not None and self.flow.write_paused:
            self.transport.abort()
        else:
            super().shutdown()

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request's headers wait for the response before it.
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._on_header_timeout)
            return
        if not self._in_message:
            self.transport.close()  # nothing asked, nothing to answer
            return
        self._refuse(408, "Request Timeout",
                     f"the request's headers did not arrive within {self.limits.header_timeout:g} s",
                     "request_timeout")

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.cycle is not None and self.cycle.response_complete:
            # Answered before its body arrived (a 413 by Content-Length, a 401): the client has its
            # answer, and a second one would be unasked for; the rest of the body is not read.
            self._refused = True
            self._cancel_timers()
            self.transport.close()
            return
        self._refuse(408, "Request Timeout",
                     f"the request's body did not arrive within {self.limits.body_timeout:g} s", "request_timeout")


def uvicorn_options(config: ServerConfig) -> dict:
    """uvicorn.Config arguments for these limits: the protocol class it
    builds for each connection, no WebSocket, the keep-alive timeout."""
    protocol = type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": config})
    return {"http": protocol, "ws": "none", "timeout_keep_alive": config.keep_alive_timeout}
