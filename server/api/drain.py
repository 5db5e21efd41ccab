"""What a drain needs from the requests in flight: whether each one is
waiting on its client, and a way to end them all at the deadline.

``Drain.track`` wraps a generation request's ASGI receive/send (the
``InFlight`` middleware): a request is *stalled* while its body has not
fully arrived or a write of its response has not been accepted (a client
that stopped reading), timed from the last piece of the body that came, so
a slow upload that keeps arriving is not taken for a stalled one. Requests
register an ``on_deadline`` hook while they wait on the engine: at the
deadline a stream puts its ``shutdown`` error event and ``[DONE]``, a
non-streamed request answers 503.
"""
from __future__ import annotations

import time
from typing import Callable

# An error's fields when the drain deadline ends a request (code "shutdown").
SHUTDOWN = ("the server is shutting down: the request did not finish within --drain-timeout", "server_error",
            None, "shutdown")


class Tracked:
    """One request in flight: since when it waits on its client (None: not)."""

    __slots__ = ("waiting_since",)

    def __init__(self, now: float):
        self.waiting_since: float | None = now  # until the body has arrived


class Drain:
    def __init__(self) -> None:
        self.requests: set[Tracked] = set()
        self.expired = False  # the deadline passed: hooks ran, new hooks run at once
        self._hooks: set[Callable[[], None]] = set()

    def track(self, receive, send):
        """A tracked request and its wrapped receive/send."""
        entry = Tracked(time.monotonic())

        async def tracked_receive():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                entry.waiting_since = None
            else:  # a piece of the body: the client is slow, not stalled; it waits on it from now
                entry.waiting_since = time.monotonic()
            return message

        async def tracked_send(message):
            entry.waiting_since = time.monotonic()
            try:
                await send(message)
            finally:
                entry.waiting_since = None

        return entry, tracked_receive, tracked_send

    def all_stalled(self, for_s: float) -> bool:
        """Every request in flight has waited on its client at least ``for_s``."""
        now = time.monotonic()
        return all(e.waiting_since is not None and now - e.waiting_since >= for_s for e in self.requests)

    def on_deadline(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Registers ``hook`` (run once at the deadline); returns what unregisters it."""
        if self.expired:
            hook()
            return lambda: None
        self._hooks.add(hook)
        return lambda: self._hooks.discard(hook)

    def expire(self) -> None:
        self.expired = True
        hooks, self._hooks = self._hooks, set()
        for hook in hooks:
            hook()
