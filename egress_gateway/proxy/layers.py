"""mitmproxy protocol layers for tunnels: a byte-counting TLS/TCP passthrough and a layer that closes the client.

Both are sans-I/O like mitmproxy's own layers (events in, commands out). Imports mitmproxy only.
"""

from __future__ import annotations

from typing import Protocol

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tcp import TCPLayer


class ByteCounter(Protocol):
    bytes_sent: int  # client -> destination
    bytes_received: int  # destination -> client


class PassthroughLayer(TCPLayer):
    """Relays raw bytes (TLS stays encrypted end to end) without creating flows or firing per-message hooks."""

    def __init__(self, context: Context, counter: ByteCounter) -> None:
        super().__init__(context, ignore=True)
        self.counter = counter

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.counter.bytes_sent += len(event.data)
            else:
                self.counter.bytes_received += len(event.data)
        yield from super().relay_messages(event)


class CloseClientLayer(layer.Layer):
    """Ends a tunnel that must not reach its destination: close the client, ignore everything after."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self._closed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not self._closed:
            self._closed = True
            yield commands.CloseConnection(self.context.client)
