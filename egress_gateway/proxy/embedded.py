"""The embedded mitmproxy: a `Master` with only the proxy server and our addon, no console, no CA, no flows kept.

Owns binding the listening socket, starting the listener (`TunnelListener`: CONNECT tunnels are served there, every
other connection is handed to mitmproxy's regular-mode connection handler), closing one client connection by id,
and the graceful stop (stop accepting, let open connections drain up to a grace period, close the rest, shut the
master down). Must run inside a running event loop. Imports mitmproxy, the addon and the listener; knows nothing
about policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

from mitmproxy import options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.master import Master
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_servers import ServerInstance

from egress_gateway.proxy.addon import GatewayAddon, NextLayer
from egress_gateway.proxy.dispatch import PrecomputedDispatch
from egress_gateway.proxy.listener import TunnelListener, dials_itself

log = logging.getLogger(__name__)


def listening_socket(host: str, port: int) -> socket.socket:
    """The proxy's listening socket (also shared by worker processes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=4096)
    sock.setblocking(False)
    return sock


class _SelfConnectGuard:
    """mitmproxy's own self-connect check knows only the listeners it started; it starts none (the socket is ours),
    so this addon refuses upstream connections to the proxy's own port."""

    def __init__(self, sock: socket.socket, addon: GatewayAddon) -> None:
        host, port = sock.getsockname()[:2]
        self.own_address = (str(host), int(port))
        self.addon = addon

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is None:
            return
        host, port = str(address[0]), int(address[1])
        if dials_itself((host, port), self.own_address) or self.addon.gate.dials_itself(host, port) is not None:
            data.server.error = "egress-gateway: refusing to connect to itself"


class EmbeddedProxy:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        idle_timeout_s: float,
        data_dir: Path | None = None,
        listen_socket: socket.socket | None = None,
    ) -> None:
        """`listen_socket`: an already listening socket to accept on (worker processes share one); otherwise
        `start` binds `host:port`."""
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.data_dir = data_dir
        self.listen_socket = listen_socket
        self.master: Master | None = None
        self.proxyserver = Proxyserver()
        self._run_task: asyncio.Task[None] | None = None
        self.listener: TunnelListener | None = None

    async def start(self, addon: GatewayAddon) -> list[tuple[str, int]]:
        """Start listening; returns the bound addresses. Raises OSError if the address cannot be bound."""
        opts = options.Options()
        master = Master(opts, event_loop=asyncio.get_running_loop())
        # mitmproxy's deprecated `add_log` bridge fires a hook per log record; we log through structlog instead.
        master._legacy_log_events.uninstall()
        # Our addon first: its `server_connect` pins the checked IP before the proxy server's self-connect check.
        master.addons.add(addon, NextLayer(addon), self.proxyserver)
        sock = self.listen_socket
        if sock is None:
            try:
                sock = listening_socket(self.host, self.port)
            except OSError as exc:
                raise OSError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
            self.listen_socket = sock
        master.addons.add(_SelfConnectGuard(sock, addon))
        PrecomputedDispatch(master.addons).install()
        updates: dict[str, object] = {
            "mode": [],  # mitmproxy binds nothing: the listener below accepts and hands it what it serves
            "listen_host": self.host,
            "listen_port": self.port,
            # Never dial before our checks: the upstream opens only when our `next_layer` hands over the tunnel.
            "connection_strategy": "lazy",
            "tcp_timeout": max(1, round(self.idle_timeout_s)),
            "http2": False,
            # An upgraded connection (101) is relayed as raw TCP, counted and revocable like a tunnel (addon).
            "websocket": False,
            "rawtcp": True,
        }
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            updates["confdir"] = str(self.data_dir)
        opts.update(**updates)
        self.master = master
        # The same connection handling as mitmproxy's own regular-mode listener, for what the listener hands over.
        instance: ServerInstance[Any] = ServerInstance.make("regular", self.proxyserver)
        address = sock.getsockname()
        self.listener = TunnelListener(addon, instance.handle_stream, self.idle_timeout_s, (address[0], address[1]))
        await self.listener.start(sock)
        self._run_task = asyncio.create_task(master.run(), name="mitmproxy-master")
        return [(str(address[0]), int(address[1]))]

    @property
    def open_connections(self) -> int:
        tunnels = len(self.listener.connections) if self.listener is not None else 0
        return len(self.proxyserver.connections) + tunnels

    def close_client(self, client_id: str) -> bool:
        """Close one client connection (and with it its upstream). False if it is already gone."""
        if self.listener is not None and self.listener.close_client(client_id):
            return True
        handler = self.proxyserver.connections.get(client_id)
        if handler is None:
            return False
        io = handler.transports.get(handler.client)
        if io is None:
            return False
        if io.handler is not None:
            io.handler.cancel("closed by egress-gateway")
        elif io.writer is not None:
            io.writer.close()
        return True

    async def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.stop_accepting()
        await self.proxyserver.servers.update([])

    async def drain(self, grace_s: float) -> int:
        """Wait for open connections to finish, up to `grace_s`; close what is left. Returns how many were closed."""
        deadline = time.monotonic() + grace_s
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        leftover = [str(client_id) for client_id in self.proxyserver.connections]
        if self.listener is not None:
            leftover += list(self.listener.connections)
        for client_id in leftover:
            self.close_client(client_id)
        close_deadline = time.monotonic() + 2.0
        while self.open_connections and time.monotonic() < close_deadline:
            await asyncio.sleep(0.02)
        return len(leftover)

    async def shutdown(self) -> None:
        if self.master is None:
            return
        self.master.shutdown()
        if self._run_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._run_task
        self.master = None
