"""The proxy as a whole: the listening socket, the session listener, mitmproxy as the plain-HTTP engine, graceful stop.

Every client connection is accepted by the listener and owned by its session (`session.py`) from accept to close;
the one registry of live sessions is `GatewayAddon.clients` (`open_connections`, `drain`). A
session that is not a CONNECT tunnel lets mitmproxy's HTTP/1 layers serve the bytes (`HttpEngineConnection`),
through mitmproxy's public embedding surface: a `LiveConnectionHandler` subclass whose `handle_hook` calls our
hooks directly. There is no `Master`, no addon manager, no CA, no flow storage; nothing of mitmproxy is patched.

Facts about mitmproxy 12 this relies on (pinned `>=12.1,<13` in pyproject): `LiveConnectionHandler(reader, writer,
options, mode)` and its abstract `handle_hook`; the options the HTTP layers read (declared here with `add_option`,
as mitmproxy's `Proxyserver` addon would); hooks carry mitmproxy's `Client`, whose `id` maps to the
session (`GatewayAddon.engine_ids`); the `response` hook blocks the HTTP layer, which writes the end of the response
when the hook returns (the session waits for it before it takes a connection back for a CONNECT, `session.py`).
Must run inside a running event loop. Imports mitmproxy, the addon and the listener; knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog
from mitmproxy import http, options
from mitmproxy.proxy import commands, mode_specs
from mitmproxy.proxy.server import LiveConnectionHandler

from egress_gateway.proxy.addon import GatewayAddon
from egress_gateway.proxy.listener import Listener
from egress_gateway.proxy.session import Session
from egress_gateway.proxy.transparent import Transparent

log = structlog.get_logger("egress_gateway.proxy")

_REGULAR = mode_specs.ProxyMode.parse("regular")


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port`. Raises OSError with the address if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
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
        # The session's idle timer closes a silent connection; mitmproxy's own watchdog is only a later backstop.
        "tcp_timeout": math.ceil(2 * idle_timeout_s) + 1,
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


def gateway_hooks(addon: GatewayAddon) -> dict[str, Hook]:
    """mitmproxy hook name -> our handler. Client connect/disconnect are not hooks here: the session admits the
    client at accept and releases it at close."""

    def error(flow: http.HTTPFlow) -> None:
        addon.error(flow)  # records the failure
        addon.answer_upstream_failure(flow.client_conn.id)  # before mitmproxy's own error page

    return {
        "next_layer": addon.choose_layer,
        "requestheaders": addon.requestheaders,
        "responseheaders": addon.responseheaders,
        "response": addon.response,
        "error": error,
        "tcp_message": addon.tcp_message,
        "server_connect": addon.server_connect,
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
        hooks = gateway_hooks(addon)

        def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Session) -> Awaitable[None]:
            return HttpEngineConnection(reader, writer, opts, session, hooks, addon.engine_ids).serve()

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
