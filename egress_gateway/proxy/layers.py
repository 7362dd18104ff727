"""mitmproxy protocol layers for tunnels: a byte-counting TLS/TCP passthrough and a layer that closes the client;
and the proxy's HTTP/1 layer with a bound on the request head (`HeadLimitedHttpLayer`).

All are sans-I/O like mitmproxy's own layers (events in, commands out). Imports mitmproxy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import HttpLayer
from mitmproxy.proxy.layers.http import Http1Server, HTTPMode, ResponseProtocolError
from mitmproxy.proxy.layers.http._events import HttpEvent
from mitmproxy.proxy.layers.tcp import TCPLayer

# Called with the client id and the unparsed request-head bytes; returns the response to send before closing, or
# None while the head is within the limits.
HeadCheck = Callable[[str, bytes], bytes | None]
# Called with the client id when the request cannot be forwarded (e.g. the upstream connect failed); returns the
# response to send instead of mitmproxy's HTML error page, or None to keep mitmproxy's.
ErrorAnswer = Callable[[str], bytes | None]


class ByteCounter(Protocol):
    bytes_sent: int  # client -> destination
    bytes_received: int  # destination -> client


class ServerWatch(Protocol):
    """The tunnel's inspector, as far as this layer needs it."""

    @property
    def done(self) -> bool: ...

    def server_data(self, data: bytes) -> None: ...


class PassthroughLayer(TCPLayer):
    """Relays raw bytes (TLS stays encrypted end to end) without creating flows or firing per-message hooks.

    Until the tunnel's inspection is done (`inspector.done`), client bytes go through `inspect` (the addon's
    `tunnel_bytes`: what may be forwarded now, or None = close) and server bytes are shown to the inspector. The
    client's first `already_read` bytes were inspected before this layer existed (mitmproxy replays them to it);
    what they released is `ready`, sent first.
    """

    def __init__(
        self,
        context: Context,
        counter: ByteCounter,
        inspect: Callable[[bytes], bytes | None],
        inspector: ServerWatch,
        already_read: int,
        ready: bytes,
    ) -> None:
        super().__init__(context, ignore=True)
        self.counter = counter
        self._inspect = inspect
        self._inspector = inspector
        self._skip = already_read
        self._ready = ready
        self._closing = False

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not isinstance(event, events.DataReceived):
            yield from super().relay_messages(event)
            return
        if event.connection is not self.context.client:
            if not self._inspector.done:
                self._inspector.server_data(event.data)
            self.counter.bytes_received += len(event.data)
            yield commands.SendData(self.context.client, event.data)
            return
        data = event.data
        if self._skip:
            replayed = min(self._skip, len(data))
            self._skip -= replayed
            data = data[replayed:]
            if self._skip:
                return
            data, self._ready = self._ready + self._inspected(data), b""
        else:
            data = self._inspected(data)
        if self._closing:
            yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)
            self._handle_event = self.done
            return
        if data:
            self.counter.bytes_sent += len(data)
            yield commands.SendData(self.context.server, data)

    def _inspected(self, data: bytes) -> bytes:
        if not data or self._inspector.done:
            return data
        released = self._inspect(data)
        if released is None:
            self._closing = True
            return b""
        return released


class CloseClientLayer(layer.Layer):
    """Ends a tunnel that must not reach its destination: close the client, ignore everything after."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._closed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not self._closed:
            self._closed = True
            yield commands.CloseConnection(self.context.client)


class _HeadLimitedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server buffers a request head without bound ("FIXME: protect against header size DoS").

    This one checks the buffered head on every chunk, so an oversized or endless head is answered and closed as
    soon as it crosses a limit, before it is parsed.
    """

    def __init__(self, context: Context, check: HeadCheck, error_answer: ErrorAnswer) -> None:
        super().__init__(context)
        self._check = check
        self._error_answer = error_answer

    def send(self, event: HttpEvent) -> layer.CommandGenerator[None]:
        if (
            isinstance(event, ResponseProtocolError)
            and self.response is None
            and self.conn.state & ConnectionState.CAN_WRITE
            and (answer := self._error_answer(self.conn.id)) is not None
        ):
            yield commands.SendData(self.conn, answer)
            yield commands.CloseConnection(self.conn)
            return
        yield from super().send(event)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            refusal = self._check(self.conn.id, bytes(self.buf))
            if refusal is not None:
                yield commands.SendData(self.conn, refusal)
                yield commands.CloseConnection(self.conn)
                self.state = self.done
                return
        yield from super().read_headers(event)


class HeadLimitedHttpLayer(HttpLayer):
    """`HttpLayer` whose client side is `_HeadLimitedHttp1Server` (the proxy never offers HTTP/2 or HTTP/3)."""

    def __init__(self, context: Context, check: HeadCheck, error_answer: ErrorAnswer) -> None:
        super().__init__(context, HTTPMode.regular)
        self._check = check
        self._error_answer = error_answer

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            server = _HeadLimitedHttp1Server(self.context.fork(), self._check, self._error_answer)
            self.connections.setdefault(self.context.client, server)
        yield from super()._handle_event(event)
