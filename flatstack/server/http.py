"""The HTTP edge, before any route runs: the API key, body limits and timeouts, connection limits.

`Guard` is plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which hides a client's disconnect
from the route). It reads the whole body itself, whether sent with a Content-Length or chunked, stops
at `max_body_bytes` (413) or after `body_timeout` seconds (408), and hands the route the body it read;
after that, the route's `receive` is the connection's own, so a disconnect reaches the route at once.
`protocol` is uvicorn's h11 protocol with a deadline for a connection's first request: a client that
connects and sends nothing, or half its headers, is closed (uvicorn's keep-alive timeout covers the
time between requests; `--max-connections` caps the connections open at once)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from flatstack.server.protocol import APIError


class Guard:
    def __init__(self, app, *, api_key: str | None, open_paths: set[str], max_body_bytes: int, body_timeout: float,
                 on_status: Callable[[int], None]):
        self.app, self.api_key, self.open_paths = app, api_key, open_paths
        self.max_body_bytes, self.body_timeout, self.on_status = max_body_bytes, body_timeout, on_status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.on_status(message["status"])
            await send(message)

        try:
            self.check_key(scope)
            body = await self.read_body(scope, receive)
        except APIError as e:
            return await e.response()(scope, receive, counted_send)
        if body is None:
            return  # the client left while sending its body: nobody to answer
        await self.app(scope, replay(body, receive), counted_send)

    def check_key(self, scope) -> None:
        if self.api_key is None or scope["path"] in self.open_paths:
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    async def read_body(self, scope, receive) -> bytes | None:
        too_large = APIError(413, f"request body is over the limit of {self.max_body_bytes} bytes",
                             code="request_too_large", headers={"connection": "close"})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise too_large
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                               code="request_timeout", headers={"connection": "close"}) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """A `receive` that gives the body once, then whatever the connection says next (a disconnect)."""
    given = False

    async def receive_after_body():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_after_body


def protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose first request's headers are not complete
    within `header_timeout` seconds."""

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.header_timer = self.loop.call_later(header_timeout, self.close_if_no_request)

        def close_if_no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self.header_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol
