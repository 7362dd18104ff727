"""The proxy as a whole: the listening socket, the session listener, mitmproxy as the plain-HTTP engine, graceful stop.

Every client connection is accepted by the listener and owned by its session (`session.py`) from accept to close;
the one registry of live sessions is `GatewayAddon.clients` (`open_connections`, `close_client`, `drain`). A
session that is not a CONNECT tunnel lets mitmproxy's HTTP/1 layers serve the bytes (`HttpEngineConnection`),
through mitmproxy's public embedding surface: a `LiveConnectionHandler` subclass whose `handle_hook` calls our
hooks directly. There is no `Master`, no addon manager, no CA, no flow storage; nothing of mitmproxy is patched.

Facts about mitmproxy 12 this relies on (pinned `>=12.1,<13` in pyproject): `LiveConnectionHandler(reader, writer,
options, mode)` and its abstract `handle_hook`; the options the HTTP layers read (declared here with `add_option`,
as mitmproxy's `Proxyserver` addon would); hooks carry mitmproxy's `Client`, whose `id` maps to the
session (`GatewayAddon.engine_ids`).
Must run inside a running event loop. Imports mitmproxy, the addon and the listener; knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog
from mitmproxy import http, options
from mitmproxy.proxy import commands, mode_specs, server_hooks
from mitmproxy.proxy.server import LiveConnectionHandler

from egress_gateway.proxy.addon import GatewayAddon
from egress_gateway.proxy.listener import Listener, dials_itself
from egress_gateway.proxy.session import Session
from egress_gateway.proxy.transparent import Transparent

log = structlog.get_logger("egress_gateway.proxy")

_REGULAR = mode_specs.ProxyMode.parse("regular")


def listening_socket(host: str, port: int) -> socket.socket:
    """The proxy's listening socket (also shared by worker processes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=4096)
    sock.setblocking(False)
    return sock


def engine_options(idle_timeout_s: float, data_dir: Path | None) -> options.Options:
    """The options mitmproxy's HTTP/TCP layers read. Those that belong to its `Proxyserver` addon (not loaded) are
    declared here with the same types."""
    opts = options.Options()
    opts.add_option("connection_strategy", str, "lazy", "Never dial before our checks (the upstream opens lazily).")
    opts.add_option("store_streamed_bodies", bool, False, "Streamed bodies are never kept.")
    opts.add_option("stream_large_bodies", str | None, None, "Unused: every body is streamed (requestheaders).")
    opts.add_option("body_size_limit", str | None, None, "No body size limit.")
    opts.add_option("keep_host_header", bool, False, "mitmproxy's default.")
    opts.add_option("normalize_outbound_headers", bool, True, "mitmproxy's default.")
    opts.add_option("validate_inbound_headers", bool, True, "mitmproxy's default.")
    updates: dict[str, object] = {
        "tcp_timeout": max(1, round(idle_timeout_s)),
        "http2": False,
        # An upgraded connection (101) is relayed as raw TCP, counted and revocable like a tunnel (addon).
        "websocket": False,
        "rawtcp": True,
    }
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        updates["confdir"] = str(data_dir)
    opts.update(**updates)
    return opts


Hook = Callable[..., object]


class HttpEngineConnection(LiveConnectionHandler):
    """mitmproxy's connection handler for one session's plain-HTTP bytes; its hooks are ours, called in place."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        opts: options.Options,
        session: Session,
        hooks: Mapping[str, Hook],
        engine_ids: dict[str, str],
    ) -> None:
        super().__init__(reader, writer, opts, _REGULAR)
        self.session = session
        self.hooks = hooks
        self.engine_ids = engine_ids

    async def serve(self) -> None:
        """Serve until the client leaves; meanwhile hooks carrying this client find its session."""
        self.engine_ids[self.client.id] = self.session.id
        try:
            await self.handle_client()
        finally:
            self.engine_ids.pop(self.client.id, None)

    async def handle_hook(self, hook: commands.StartHook) -> None:
        handler = self.hooks.get(hook.name)
        if handler is None:
            return
        try:
            result = handler(*hook.args())
            if inspect.isawaitable(result):
                await result
        except Exception:  # a bug costs this request, and is visible; mitmproxy's layers go on
            log.exception("hook_failed", hook=hook.name)
        if hook.name in ("response", "error"):
            self.session.engine_answered()


def gateway_hooks(
    addon: GatewayAddon, own_address: tuple[str, int], answer: Callable[[str, bytes], None]
) -> dict[str, Hook]:
    """mitmproxy hook name -> our handler. Client connect/disconnect are not hooks here: the session admits the
    client at accept and releases it at close."""

    def server_connect(data: server_hooks.ServerConnectionHookData) -> None:
        addon.server_connect(data)  # pins the checked IP (or refuses)
        address = data.server.address
        if data.server.error is None and address is not None:
            host, port = str(address[0]), int(address[1])
            if dials_itself((host, port), own_address) or addon.gate.dials_itself(host, port) is not None:
                data.server.error = "egress-gateway: refusing to connect to itself"

    def error(flow: http.HTTPFlow) -> None:
        addon.error(flow)  # records the failure
        reply = addon.upstream_error_response(flow.client_conn.id)
        if reply is not None:  # our 502/504 with Proxy-Status, sent and closed before mitmproxy's own error page
            answer(flow.client_conn.id, reply)

    return {
        "next_layer": addon.choose_layer,
        "requestheaders": addon.requestheaders,
        "responseheaders": addon.responseheaders,
        "response": addon.response,
        "error": error,
        "tcp_message": addon.tcp_message,
        "server_connect": server_connect,
        "server_connected": addon.server_connected,
        "server_connect_error": addon.server_connect_error,
    }


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
        self.listener: Listener | None = None
        self.transparent_listeners: list[Listener] = []

    async def start(self, addon: GatewayAddon) -> list[tuple[str, int]]:
        """Start listening; returns the bound addresses. Raises OSError if the address cannot be bound."""
        sock = self.listen_socket
        if sock is None:
            try:
                sock = listening_socket(self.host, self.port)
            except OSError as exc:
                raise OSError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
            self.listen_socket = sock
        address = sock.getsockname()
        own_address = (str(address[0]), int(address[1]))
        opts = engine_options(self.idle_timeout_s, self.data_dir)

        def answer(client_id: str, reply: bytes) -> None:
            if self.listener is not None:
                self.listener.answer_and_close(addon.session_id(client_id), reply)

        hooks = gateway_hooks(addon, own_address, answer)

        def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session) -> Awaitable[None]:
            return HttpEngineConnection(reader, writer, opts, session, hooks, addon.engine_ids).serve()

        self.listener = Listener(addon, serve_http, self.idle_timeout_s, own_address)
        await self.listener.start(sock)
        return [own_address]

    async def start_transparent(self, addon: GatewayAddon, host: str, port: int, mode: Transparent) -> tuple[str, int]:
        """Start a name-routed listener (transparent mode) after `start`; returns its bound address."""
        if self.listener is None:
            raise RuntimeError("start the proxy listener first")
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        address = sock.getsockname()
        own_address = (str(address[0]), int(address[1]))
        listener = Listener(addon, self.listener.hand_over, self.idle_timeout_s, own_address, transparent=mode)
        await listener.start(sock)
        self.transparent_listeners.append(listener)
        return own_address

    @property
    def open_connections(self) -> int:
        return self.listener.sessions if self.listener is not None else 0

    def close_client(self, client_id: str) -> bool:
        """Close one client connection (and with it its upstream). False if it is already gone."""
        return self.listener is not None and self.listener.close_client(client_id)

    async def stop_accepting(self) -> None:
        if self.listener is not None:
            self.listener.stop_accepting()
        for listener in self.transparent_listeners:
            listener.stop_accepting()

    async def drain(self, grace_s: float) -> int:
        """Wait for open connections to finish, up to `grace_s`; close what is left. Returns how many were closed."""
        deadline = time.monotonic() + grace_s
        while self.open_connections and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        leftover = self.listener.session_ids() if self.listener is not None else []
        for client_id in leftover:
            self.close_client(client_id)
        close_deadline = time.monotonic() + 2.0
        while self.open_connections and time.monotonic() < close_deadline:
            await asyncio.sleep(0.02)
        return len(leftover)

    async def shutdown(self) -> None:
        for listener in (*([self.listener] if self.listener is not None else []), *self.transparent_listeners):
            await listener.wait_closed(timeout_s=2.0)
