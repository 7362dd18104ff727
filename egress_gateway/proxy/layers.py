"""The mitmproxy layer for a CONNECT that arrives after plain HTTP on one connection: a byte-counting TLS/TCP
passthrough on mitmproxy's public `TCPLayer` (a denied tunnel is closed by its session instead).

Sans-I/O like mitmproxy's own layers (events in, commands out). Imports mitmproxy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TCPLayer


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
        self._ended = False  # both connections were closed: ignore what follows

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self._ended:
            return
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
            self._ended = True
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
