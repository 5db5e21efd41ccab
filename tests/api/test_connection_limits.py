"""Connection limits on the wire (server/api/http_limits.py): raw sockets
against a live server, as a hostile client would send them."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from server.config import ServerConfig
from tests.api.conftest import start_server, wait_for

TIMEOUT = 0.6  # header, body and keep-alive timeouts of the server under test


@pytest.fixture(scope="module")
def limited(text_ckpt):
    srv = start_server(text_ckpt, ServerConfig(default_max_tokens=8, default_block_length=8, header_timeout=TIMEOUT,
                                               body_timeout=TIMEOUT, keep_alive_timeout=TIMEOUT, max_connections=6))
    yield srv
    srv.stop()


def connect(srv) -> socket.socket:
    port = int(srv.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset after the answer counts as the end)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def status_and_body(raw: bytes) -> tuple[int, dict | None, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body), head.lower()
    except ValueError:
        return status, None, head.lower()


def ask(srv, data: bytes) -> tuple[int, dict | None, bytes, float]:
    started = time.monotonic()
    with connect(srv) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-send: the answer is still there to read
        raw = read_all(sock)
    return (*status_and_body(raw), time.monotonic() - started)


def get_health(extra: bytes = b"") -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + b"\r\n"


def test_a_huge_header_is_cut_short_with_431_while_health_stays_fast(limited):
    status, body, head, _ = ask(limited, get_health(b"X-Big: " + b"a" * 100_000 + b"\r\n"))
    assert status == 431 and body["error"]["code"] == "headers_too_large" and b"connection: close" in head
    assert "65536 bytes" in body["error"]["message"]

    result = {}

    def send_huge():  # 64 MiB of one header value: read only up to the limit
        result["answer"] = ask(limited, get_health(b"X-Big: " + b"a" * (64 << 20) + b"\r\n"))

    sender = threading.Thread(target=send_huge)
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(limited.url + "/health").status_code == 200
        slowest = max(slowest, time.monotonic() - started)
    sender.join()
    status, body, _, elapsed = result["answer"]
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    assert elapsed < 5 and slowest < 1.0


def test_header_count_limit(limited):
    fields = lambda n: b"".join(b"X-%d: 1\r\n" % i for i in range(n))  # noqa: E731
    # Host and Connection plus 98 more: exactly the default 100 fields are served
    assert ask(limited, get_health(fields(98)))[0] == 200
    status, body, _, elapsed = ask(limited, get_health(fields(99)))
    assert status == 431 and body["error"]["code"] == "too_many_headers" and "100 header fields" in body["error"]["message"]
    status, body, _, _ = ask(limited, get_health(fields(10_000)))
    assert status == 431 and body["error"]["code"] == "too_many_headers"


def test_slow_headers_get_408_and_an_idle_connection_is_closed(limited):
    with connect(limited) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a byte now and then does not reset the clock
            time.sleep(TIMEOUT / 4)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        status, body, head = status_and_body(read_all(sock))
        elapsed = time.monotonic() - started
    assert status == 408 and body["error"]["code"] == "request_timeout" and b"connection: close" in head
    assert TIMEOUT * 0.9 < elapsed < TIMEOUT + 2
    with connect(limited) as sock:  # never sends a byte
        started = time.monotonic()
        assert read_all(sock) == b""
        assert time.monotonic() - started < TIMEOUT + 2


def test_a_stalled_body_gets_408_and_frees_the_request(limited):
    body = b'{"prompt": "hello", "max_tokens": 4}'
    status, err, head, elapsed = ask(limited, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
    assert status == 408 and err["error"]["code"] == "request_timeout" and "body" in err["error"]["message"]
    assert elapsed < TIMEOUT + 2
    assert wait_for(lambda: limited.state.in_flight == 0, 5)
    # the same request sent whole is served
    r = httpx.post(limited.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_keep_alive_timeout_closes_an_idle_connection(limited):
    with connect(limited) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        started = time.monotonic()
        assert read_all(sock) == b""  # closed by the server, nothing more sent
        assert TIMEOUT * 0.9 < time.monotonic() - started < TIMEOUT + 2


def test_connections_beyond_the_cap_get_503(limited):
    others = [connect(limited) for _ in range(6)]  # max_connections: 6, all held open
    try:
        assert wait_for(lambda: len(limited.server.server_state.connections) >= 6, 2)
        status, body, head, _ = ask(limited, get_health())
        assert status == 503 and body["error"]["code"] == "too_many_connections" and b"connection: close" in head
    finally:
        for sock in others:
            sock.close()
    assert wait_for(lambda: len(limited.server.server_state.connections) == 0, 5)
    assert ask(limited, get_health())[0] == 200


def test_upgrade_is_ignored_and_one_with_a_body_refused(limited):
    upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    status, body, head, _ = ask(limited, b"GET /health HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n")
    assert status == 200 and body == {"status": "ok"} and b"connection: close" in head
    payload = b'{"prompt": "hello", "max_tokens": 4}'
    status, body, head, elapsed = ask(
        limited, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + upgrade +
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
    assert status == 400 and body["error"]["code"] == "upgrade_not_supported" and b"connection: close" in head
    assert elapsed < 2


def test_shutdown_answers_a_request_still_arriving_and_cuts_an_unread_response():
    """What uvicorn's shutdown asks of each connection (drain's end): a
    request still arriving gets a 503; a response its client stopped reading
    (writes paused) is aborted instead of waiting on it; an idle one closes."""
    import asyncio
    from unittest import mock

    import uvicorn
    from uvicorn.server import ServerState as UvicornState

    from server.api.http_limits import uvicorn_options

    loop = asyncio.new_event_loop()
    try:
        protocol_class = uvicorn_options(ServerConfig())["http"]

        def connection() -> tuple:
            transport = mock.MagicMock()
            transport.get_extra_info.return_value = None
            transport.is_closing.return_value = False
            proto = protocol_class(config=uvicorn.Config(app=lambda *a: None), server_state=UvicornState(),
                                   app_state={}, _loop=loop)
            proto.connection_made(transport)
            return proto, transport

        arriving, transport = connection()
        arriving.data_received(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        arriving.shutdown()
        written = b"".join(call.args[0] for call in transport.write.call_args_list)
        assert written.startswith(b"HTTP/1.1 503") and b'"code":"shutdown"' in written

        unread, transport = connection()
        unread.flow.pause_writing()
        unread.shutdown()
        transport.abort.assert_called_once()

        idle, transport = connection()
        idle.shutdown()
        transport.close.assert_called()
        transport.abort.assert_not_called()
    finally:
        pending = asyncio.all_tasks(loop)  # the app task the arriving request started
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def test_an_early_answer_is_the_only_answer_to_a_body_still_arriving(limited):
    """A body refused by its Content-Length (413) before it arrives: the
    client gets the 413 alone, and at the body timeout the connection closes
    without a second, unasked-for 408."""
    big = 2 << 20  # over the default 1 MiB body limit
    with connect(limited) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % big + b"{" * 1000)
        started = time.monotonic()
        raw = read_all(sock)
    assert raw.count(b"HTTP/1.1 ") == 1, raw[:400]
    assert status_and_body(raw)[0] == 413
    assert time.monotonic() - started < TIMEOUT + 3  # closed at the body timeout, not kept open
