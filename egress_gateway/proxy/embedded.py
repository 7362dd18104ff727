"""The proxy as a whole: the listening sockets, the listeners, graceful stop.

Every client connection is accepted by a listener and owned by its session (`session.py`) from accept to close;
the one registry of live sessions is `GatewayAddon.clients` (`open_connections`, `drain`). A session that is not a
CONNECT tunnel lets mitmproxy's HTTP/1 layers serve the bytes (`http_engine.py`). Must run inside a running event
loop. Imports the addon, the listener and the HTTP engine; knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from pathlib import Path

from egress_gateway.proxy.addon import GatewayAddon
from egress_gateway.proxy.http_engine import HttpEngineConnection, engine_options
from egress_gateway.proxy.listener import Listener
from egress_gateway.proxy.session import Session
from egress_gateway.proxy.transparent import Transparent


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port`. Raises OSError with the address if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


class EmbeddedProxy:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        idle_timeout_s: float,
        data_dir: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.data_dir = data_dir
        self.addon: GatewayAddon | None = None
        self.listeners: list[Listener] = []  # the proxy port's first, then the name-routed ones

    async def start(self, addon: GatewayAddon) -> list[tuple[str, int]]:
        """Start listening; returns the bound addresses. Raises OSError if the address cannot be bound."""
        sock = listening_socket(self.host, self.port)
        opts = engine_options(self.idle_timeout_s, self.data_dir)

        def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session) -> Awaitable[None]:
            return HttpEngineConnection(reader, writer, opts, session).handle_client()

        self.addon = addon
        self.listeners.append(Listener(addon, serve_http, self.idle_timeout_s))
        await self.listeners[0].start(sock)
        address = sock.getsockname()
        return [(str(address[0]), int(address[1]))]

    async def start_transparent(self, addon: GatewayAddon, host: str, port: int, mode: Transparent) -> tuple[str, int]:
        """Start a name-routed listener (transparent mode) after `start`; returns its bound address."""
        if not self.listeners:
            raise RuntimeError("start the proxy listener first")
        sock = listening_socket(host, port)
        listener = Listener(addon, self.listeners[0].hand_over, self.idle_timeout_s, transparent=mode)
        await listener.start(sock)
        self.listeners.append(listener)
        address = sock.getsockname()
        return str(address[0]), int(address[1])

    @property
    def open_connections(self) -> int:
        return len(self.addon.clients) if self.addon is not None else 0

    async def stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.stop_accepting()

    async def drain(self, grace_s: float) -> int:
        """Wait for open connections to finish, up to `grace_s`; close what is left. Returns how many were closed."""
        deadline = time.monotonic() + grace_s
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        leftover = list(self.addon.clients) if self.addon is not None else []
        for client_id in leftover:
            if self.addon is not None:
                self.addon.close_client(client_id)
        close_deadline = time.monotonic() + 2.0
        while self.open_connections and time.monotonic() < close_deadline:
            await asyncio.sleep(0.02)
        return len(leftover)

    async def shutdown(self) -> None:
        for listener in self.listeners:
            await listener.wait_closed(timeout_s=2.0)
