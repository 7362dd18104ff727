"""mitmproxy's HTTP/1 layers as the plain-HTTP engine of a session: its options, its connection handler, our hooks, the
transport it writes through, and the bytes each exchange puts on the wire.

A session that is not a CONNECT tunnel hands its released client bytes to `HttpEngineConnection`, a subclass of
mitmproxy's public `LiveConnectionHandler` whose `handle_hook` calls the session's `EngineHooks` in place: no
`Master`, no addon manager, no CA, no flow storage; nothing of mitmproxy is patched. The hooks apply the addon's
checks (`addon.py`: decision, refusal, the registry's timers and tunnels) and own what only plain HTTP has: the
pinned address per (host, port), the upstream connect timer and failure, the hop-by-hop stripping, the byte counts.

Facts about mitmproxy 12 this relies on (pinned `>=12.1,<13`): `LiveConnectionHandler(reader, writer, options, mode)`
and its abstract `handle_hook`, called for the one client connection it handles; the options its HTTP layers read
(declared here with `add_option`, as its `Proxyserver` addon would); the `response` hook blocks the HTTP layer, which
writes the end of the response when the hook returns (the session waits for it before it takes a connection back for
a CONNECT); a message whose `stream` is a callable hands it every body chunk before writing it, and a head is written
as `http1.assemble_request_head` / `assemble_response_head`; a chunked message is written with the chunked framing
around each non-empty chunk and a last `0\\r\\n\\r\\n` (counted too: a record's figure is what crossed the socket,
docs/audit.md). Imports mitmproxy and the addon; knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from mitmproxy import http, options, tcp
from mitmproxy.net.http import http1, url
from mitmproxy.proxy import commands, layer, mode_specs, server_hooks
from mitmproxy.proxy.layers import HttpLayer
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.server import LiveConnectionHandler

from egress_gateway.audit.recorder import ConnectionRecord
from egress_gateway.policy.decision import Decision, Facts, Reason, adapter_denial
from egress_gateway.proxy import responses
from egress_gateway.proxy.addon import ClientState
from egress_gateway.wire.heads import FRAMING_HEADERS
from egress_gateway.wire.inspection import TunnelInspector

if TYPE_CHECKING:
    from egress_gateway.proxy.session import Session

log = structlog.get_logger("egress_gateway.proxy")

_REGULAR = mode_specs.ProxyMode.parse("regular")
_RECORD_KEY = "egress_gateway.record"
_VERDICT_KEY = "egress_gateway.verdict"
_BYTES_KEY = "egress_gateway.bytes"
# Never forwarded upstream (RFC 9110 7.6.1 plus the proxy-specific ones clients send).
_HOP_BY_HOP = ("proxy-authorization", "proxy-authenticate", "proxy-connection", "keep-alive", "te", "trailer")
_KEEP_CONNECTION_TOKENS = frozenset({"close", "keep-alive", "upgrade"})
_LAST_CHUNK = len(b"0\r\n\r\n")


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
        # An upgraded connection (101) is relayed as raw TCP, counted and revocable like a tunnel (`_upgraded`).
        "websocket": False,
        "rawtcp": True,
    }
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        updates["confdir"] = str(data_dir)
    opts.update(**updates)
    return opts


class HttpEngineConnection(LiveConnectionHandler):
    """mitmproxy's connection handler for one session's plain-HTTP bytes; its hooks are the session's `EngineHooks`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opts: options.Options, session: Session
    ) -> None:
        super().__init__(reader, writer, opts, _REGULAR)
        self.session = session
        self.hooks = EngineHooks(session)

    async def handle_hook(self, hook: commands.StartHook) -> None:
        handler = getattr(self.hooks, hook.name, None)
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


class EngineTransport(asyncio.Transport):
    """The session's socket as mitmproxy's HTTP engine sees it: writes and closes pass through until the session
    takes the connection back for a CONNECT (`detached`); while a CONNECT waits (`held`) the session alone decides
    when the socket is read."""

    def __init__(self, transport: asyncio.Transport, session: Session) -> None:
        super().__init__()
        self.transport = transport
        self.session = session
        self.held = False
        self.detached = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.detached:
            self.transport.write(data)
            self.session.last_activity = self.session.loop.time()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def write_eof(self) -> None:
        if not self.detached:
            self.transport.write_eof()

    def is_closing(self) -> bool:
        return self.detached or self.transport.is_closing()

    def close(self) -> None:
        if not self.detached:
            self.transport.close()

    def abort(self) -> None:
        if not self.detached:
            self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def pause_reading(self) -> None:
        if not self.detached:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not (self.held or self.detached):
            self.transport.resume_reading()


class EngineHooks:
    """The hooks of one session's HTTP engine, named after mitmproxy's events (client connect/disconnect are not
    hooks here: the session admits the client at accept and releases it at close)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.addon = session.addon
        self.pins: dict[tuple[str, int], str] = {}  # (host, port) -> the checked IP dialed for it
        self.failure: Decision | None = None  # why the upstream connect of the current request failed
        self.connect_timers: dict[str, asyncio.TimerHandle] = {}  # mitmproxy's server id -> connect timer
        self.timed_out: set[str] = set()

    def _state(self) -> ClientState | None:
        """The session's state while it is registered (None: it is gone, revoked or closed)."""
        state = self.session.state
        return state if state is not None and self.addon.clients.get(self.session.id) is state else None

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The first layer is mitmproxy's HTTP/1 layer (the session checks every request head before mitmproxy reads
        it). A CONNECT never reaches mitmproxy: the session takes the connection back."""
        if nextlayer.layer is None and len(nextlayer.context.layers) <= 1:
            nextlayer.layer = HttpLayer(nextlayer.context, HTTPMode.regular)
        elif nextlayer.layer is None:
            self.session.abort()  # not expected: fail closed

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self._state()
        if state is None:
            flow.kill()
            return
        self.addon.request_arrived(state)
        request = flow.request
        record = self.addon.recorder.open(request.method, state.address, state.port)
        flow.metadata[_RECORD_KEY] = record
        if request.scheme != "http":
            decision = adapter_denial(
                Reason.BAD_REQUEST,
                f"{request.scheme}:// URLs are not fetched by the gateway; use CONNECT (HTTPS_PROXY)",
            )
            record.decided(Facts(identity=None, target=request.host, port=request.port), decision)
            self._deny(flow, state, record, decision)
            return
        host_header = request.host_header
        if host_header is None:
            host_header = url.hostport("http", request.host, request.port)
        verdict = await self.addon.decide(state, record, request, host_header=host_header)
        if not verdict.decision.allowed or verdict.address is None:
            self._deny(flow, state, record, verdict.decision)
            return
        self.pins[(request.host, request.port)] = str(verdict.address)
        flow.metadata[_VERDICT_KEY] = verdict
        _strip_hop_by_hop(request.headers)
        flow.metadata[_BYTES_KEY] = ExchangeBytes.streaming(request)  # every body streamed through a byte counter

    def _deny(self, flow: http.HTTPFlow, state: ClientState, record: ConnectionRecord, decision: Decision) -> None:
        flow.response = self.addon.refusal(state, record, decision)
        flow.metadata.pop(_RECORD_KEY, None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = flow.metadata.get(_RECORD_KEY)
        if record is not None and flow.response is not None:
            record.set(http_response_status_code=flow.response.status_code)
            counted = flow.metadata.get(_BYTES_KEY)
            if counted is not None:
                counted.request_written(flow.request)
                counted.stream_response(flow.response)
            else:
                flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        state = self._state()
        if state is not None and state.tunnel is None and self._upgraded(state, flow):
            return
        if state is not None and state.tunnel is None:
            self.addon.await_request(state)  # keep-alive: the next head has client_request_s too (no slowloris)
        record = flow.metadata.pop(_RECORD_KEY, None)
        if record is not None:
            if flow.response is not None:
                record.set(http_response_status_code=flow.response.status_code)
            sent, received = _exchanged(flow)
            record.close(bytes_sent=sent, bytes_received=received)

    def _upgraded(self, state: ClientState, flow: http.HTTPFlow) -> bool:
        """101 Switching Protocols (WebSocket or any other upgrade): from here on the connection is a tunnel to the
        checked address. Its record stays open and counts bytes (`tcp_message`), and revocation closes it like any
        tunnel. mitmproxy relays it as raw TCP (`websocket` off, `rawtcp` on): the bytes are never reframed."""
        verdict = flow.metadata.get(_VERDICT_KEY)
        record = flow.metadata.get(_RECORD_KEY)
        if flow.response is None or flow.response.status_code != 101 or verdict is None or record is None:
            return False
        flow.metadata.pop(_RECORD_KEY, None)
        record.set(http_response_status_code=101)
        record.event("upgraded", protocol=flow.response.headers.get("upgrade", ""))
        tunnel = self.addon.tunnel_for(state, record, verdict, TunnelInspector(self.addon.head_limits))
        if tunnel is not None:
            tunnel.opened = True
            # the upgrade request and the 101 count as the tunnel's first bytes
            tunnel.bytes_sent, tunnel.bytes_received = _exchanged(flow)
        return True

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        """Bytes of an upgraded connection (mitmproxy's TCP layer after a 101): counted, then dropped from the flow so
        a long-lived connection does not keep every message in memory."""
        state = self._state()
        tunnel = state.tunnel if state is not None else None
        if flow.messages:
            message = flow.messages[-1]
            if tunnel is not None:
                if message.from_client:
                    tunnel.bytes_sent += len(message.content)
                else:
                    tunnel.bytes_received += len(message.content)
            flow.messages.clear()

    def error(self, flow: http.HTTPFlow) -> None:
        """Records the failure; a failed upstream connect is answered with our 502/504 and Proxy-Status, and closed
        (before mitmproxy would send its own error page)."""
        record = flow.metadata.pop(_RECORD_KEY, None)
        failure, self.failure = self.failure, None
        verdict = flow.metadata.get(_VERDICT_KEY)
        if record is not None and failure is not None and verdict is not None:
            record.decided(verdict.facts, failure)
            record.set(http_response_status_code=responses.status_for(failure.reason)[0])
        if record is not None:
            if flow.error is not None:
                record.set(error=flow.error.msg)
            if failure is not None:  # nothing reached the origin
                record.close()
            else:
                counted = flow.metadata.get(_BYTES_KEY)
                if counted is not None and flow.server_conn.timestamp_tcp_setup is not None:
                    counted.request_written(flow.request)
                sent, received = _exchanged(flow, ended=False)
                record.close(bytes_sent=sent, bytes_received=received)
        if failure is not None and self._state() is not None:
            self.session.answer_and_close(http1.assemble_response(responses.denial(failure)))

    # ---- upstream connections -------------------------------------------------------------------------------
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        state, address = self._state(), data.server.address
        # An upgraded connection never dials again; an address is dialed only as the gate approved and pinned it.
        pinned = self.pins.get((address[0], address[1])) if state and state.tunnel is None and address else None
        if pinned is None or address is None:
            # Defence in depth: mitmproxy never dials anything the gate did not approve and pin.
            data.server.error = "egress-gateway: upstream address was not approved"
            return
        data.server.address = (pinned, address[1])
        if self.addon.gate.own.dials_itself(pinned, address[1]) is not None:  # checked at the decision; again here
            data.server.error = "egress-gateway: refusing to connect to itself"
            return
        task = asyncio.current_task()
        if task is not None:
            self.connect_timers[data.server.id] = asyncio.get_running_loop().call_later(
                self.addon.timeouts.connect_s, self._connect_timeout, data.server.id, task
            )

    def _connect_timeout(self, server_id: str, task: asyncio.Task[Any]) -> None:
        self.connect_timers.pop(server_id, None)
        self.timed_out.add(server_id)
        task.cancel("connect timeout")

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if (timer := self.connect_timers.pop(data.server.id, None)) is not None:
            timer.cancel()

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.server_connected(data)
        timed_out = data.server.id in self.timed_out
        self.timed_out.discard(data.server.id)
        if data.server.address is not None and self._state() is not None:  # recorded and answered by `error`
            host, port = data.server.address[0], data.server.address[1]
            self.failure = self.addon.connect_failure(host, port, timed_out, data.server.error)


def _strip_hop_by_hop(headers: http.Headers) -> None:
    """Remove hop-by-hop headers, never a framing header (a head naming one in Connection was refused already;
    skipping them here keeps any rewrite from changing how the origin frames the message)."""
    named = [
        token.strip().lower()
        for value in headers.get_all("connection")
        for token in value.split(",")
        if token.strip() and token.strip().lower() not in _KEEP_CONNECTION_TOKENS | FRAMING_HEADERS
    ]
    for name in (*_HOP_BY_HOP, *named):
        if name in headers:
            del headers[name]


# ---- the bytes of an exchange as written ---------------------------------------------------------------------------
def _chunked(message: http.Message) -> bool:
    return "chunked" in message.headers.get("transfer-encoding", "").lower()


@dataclass(slots=True)
class MessageBytes:
    """The stream callable of one message: counts its body (with chunked framing) as mitmproxy writes it."""

    chunked: bool = False
    body: int = 0
    ended: bool = False

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            self.body += len(chunk) + (len(b"%x\r\n\r\n" % len(chunk)) if self.chunked else 0)
        elif not self.ended:  # mitmproxy's end-of-message call
            self.ended = True
            if self.chunked:
                self.body += _LAST_CHUNK
        return chunk


@dataclass(slots=True)
class ExchangeBytes:
    """One request and its response through mitmproxy: `sent` (to the origin) and `received` (to the client)."""

    request: MessageBytes
    response: MessageBytes = field(default_factory=MessageBytes)
    request_head: int = 0  # counted when the head is known to have been written
    response_head: int = 0

    @classmethod
    def streaming(cls, request: http.Request) -> ExchangeBytes:
        """Counts for `request` (its headers final), installed as its stream callable."""
        counted = cls(MessageBytes(chunked=_chunked(request)))
        request.stream = counted.request
        return counted

    def stream_response(self, response: http.Response) -> None:
        """At `responseheaders`: the response goes through the counter. Its head is written to the client right after
        the hook (or, without a body, right after the `response` hook)."""
        self.response = MessageBytes(chunked=_chunked(response))
        self.response_head = len(http1.assemble_response_head(response))
        response.stream = self.response

    def request_written(self, request: http.Request) -> None:
        """The request head went to the origin (it is written before any response can arrive)."""
        if not self.request_head:
            self.request_head = len(http1.assemble_request_head(request))

    def response_ended(self, request: http.Request, response: http.Response) -> None:
        """At the `response` hook. mitmproxy streams every response body through our callable; a response without
        one (its end right after the head) still ends with a last chunk when it says chunked and does not answer a
        HEAD."""
        if not self.response.ended and _chunked(response) and request.method.upper() != "HEAD":
            self.response.ended = True
            self.response.body += _LAST_CHUNK

    @property
    def sent(self) -> int:
        return self.request_head + self.request.body

    @property
    def received(self) -> int:
        return self.response_head + self.response.body


def _exchanged(flow: http.HTTPFlow, *, ended: bool = True) -> tuple[int, int]:
    """The bytes of a plain-HTTP exchange so far: (to the origin, to the client). `ended`: at the `response` hook."""
    counted = flow.metadata.get(_BYTES_KEY)
    if not isinstance(counted, ExchangeBytes):
        return 0, 0
    if ended:
        counted.request_written(flow.request)
        if flow.response is not None:
            counted.response_ended(flow.request, flow.response)
    return counted.sent, counted.received
