"""One client connection, one owner: the `Session` holds the accepted socket from accept to close.

Through its stages: sniff, request head, admission and decision (the addon and the gate), first tunnel bytes
(the tunnel's inspector), dial of the pinned address, relay (one relay: each chunk written straight to the other
transport, the transports' flow control, half-closes passed on, one idle timer); or, for a connection that is not a
CONNECT, plain HTTP: its client bytes still arrive here first and every request head is checked
(`plain_bytes`) before mitmproxy's HTTP engine (`http_engine.py`) reads them, and a CONNECT after plain HTTP makes
the connection this session's again (`_take_back`). Revocation, timers and drain close a session by `abort`,
whichever stage it is in.

Why tunnels do not go through mitmproxy: its per-connection machinery (the HTTP layer and its flow objects, one task
per hook, stream readers and writers, a layer call per relayed chunk) cost most of the gateway's CPU per tunnel
(docs/benchmarks.md), and a tunnel needs none of it.
Imports asyncio, the addon and the inspector; knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import structlog
from mitmproxy import http
from mitmproxy.net.http import http1

from egress_gateway.policy.decision import Decision, IPAddress
from egress_gateway.proxy import responses
from egress_gateway.proxy.addon import ClientState, Tunnel
from egress_gateway.proxy.http_engine import EngineTransport
from egress_gateway.proxy.transparent import original_destination
from egress_gateway.wire.clienthello import starts_like_tls
from egress_gateway.wire.heads import head_length
from egress_gateway.wire.inspection import Held, Inspection, TunnelInspector

if TYPE_CHECKING:
    from egress_gateway.proxy.listener import Listener

CONNECT_PREFIX = b"CONNECT "

log = structlog.get_logger("egress_gateway.proxy")


class Session(asyncio.Protocol):
    """One client connection, through its stages: sniff, request head, decision, first tunnel bytes, connect, relay.

    `_on_data` is the current stage's handler for client bytes; `buffer` holds bytes not consumed yet.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.addon = listener.addon
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.id = ""  # the registry's, at accept
        self.peer = ""  # the client's address, for log lines
        self.state: ClientState | None = None
        self.tunnel: Tunnel | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[Any] | None = None
        self.closed = False
        self.client_eof = False
        self.upstream_eof = False
        self.last_activity = 0.0
        # The one timer of a tunnel's stages (`_stage`): the ClientHello's deadline, then the dial's, then idle.
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.expired: Callable[[], None] = self.abort  # each stage sets its own
        self._on_data: Callable[[bytes], None] = self._sniff
        # Plain HTTP: the request-head checks before mitmproxy reads; mitmproxy's side of the socket; how many
        # released requests still wait for mitmproxy's response.
        self.plain: TunnelInspector | None = None
        self.engine: EngineTransport | None = None
        self.engine_stream: _PlainHttpStream | None = None
        self.answers_due = 0
        # Transparent mode: the inspector that reads the first message (it becomes the tunnel's), what it released.
        self.first: TunnelInspector | None = None
        self.first_release = bytearray()
        self.original: IPAddress | None = None  # where a NAT-redirected client was connecting to

    # ---- asyncio.Protocol -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP listener's transport (uvloop's does not subclass asyncio.Transport, hence no isinstance check).
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername") or ("", 0)
        self.peer = str(peer[0])
        self.state = self.addon.open_client(self.peer, int(peer[1]), self)
        self.id = self.state.client_id
        transparent = self.listener.transparent
        if transparent is not None:
            self.first = TunnelInspector(self.addon.head_limits, http=not transparent.tls)
            self._on_data = self._read_first_message
            if transparent.check_original_destination:
                redirected = original_destination(self.transport.get_extra_info("socket"))
                self.original = redirected[0] if redirected is not None else None

    def data_received(self, data: bytes) -> None:
        try:
            self._on_data(data)
        except Exception:  # a bug must cost this connection only, and be visible
            log.exception("tunnel_failed", client=self.peer)
            self.abort()

    def task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "tunnel_failed",
                client=self.peer,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            self.abort()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream is None:
            return False  # nothing to relay the half-close to: close
        if self.upstream.can_write_eof():
            self.upstream.write_eof()
        if self.upstream_eof:
            self.upstream.close()
            return False
        return True  # keep sending what the destination still says

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and self.tunnel is not None and not self.task.done():
            self.task.cancel()  # the dial; a pending decision is let finish so that it is recorded
        self._stop_timer()
        if self.upstream is not None:
            self.upstream.close()
        self.addon.client_gone(self.id)
        # The session's own references back to itself (its stage handlers, its state's owner) go, so that its
        # objects are freed here by reference counting rather than by a cyclic collection under load.
        self._on_data = _discard
        self.expired = _nothing
        self.state = None

    def pause_writing(self) -> None:  # the client reads slower than the destination sends
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # ---- stages ---------------------------------------------------------------------------------------------
    def _sniff(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.startswith(CONNECT_PREFIX):
            self._on_data = self._read_head
            self._read_head(b"")
        elif not CONNECT_PREFIX.startswith(self.buffer):
            self._hand_over()

    def _read_head(self, data: bytes) -> None:
        self.buffer += data
        checked = self.addon.read_head(self.id, bytes(self.buffer))
        if checked is None:
            return
        if isinstance(checked, bytes):
            self.answer_and_close(checked)
            return
        del self.buffer[: head_length(self.buffer) or len(self.buffer)]
        self._hold()
        self.listener.spawn(self._decide(checked), self)

    async def _decide(self, request: http.Request) -> None:
        state = self.state
        if state is None or self.transport is None:
            return
        refusal = await self.addon.open_tunnel(state, request)
        if self.closed:
            return
        if refusal is not None:
            self.answer_and_close(http1.assemble_response(refusal))
            return
        self.tunnel = state.tunnel
        self.transport.write(b"%s 200 Connection established\r\n\r\n" % request.data.http_version)
        self._stage(self.addon.timeouts.client_hello_s, functools.partial(self.addon.hello_timed_out, state))
        self._on_data = self._read_first_bytes
        self.transport.resume_reading()
        if self.buffer:
            early = bytes(self.buffer)
            self.buffer.clear()
            self._read_first_bytes(early)

    def _read_first_bytes(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            self.abort()
            return
        opened = self.addon.start_tunnel(tunnel, data)
        if opened is None:
            return  # the ClientHello is not complete yet; its timer runs
        if not opened or tunnel.verdict.address is None:
            self.abort()
            return
        self._hold()
        self.listener.spawn(self._connect(tunnel), self)

    async def _connect(self, tunnel: Tunnel) -> None:
        address = (str(tunnel.verdict.address), tunnel.verdict.facts.port)
        error: str | None = None
        upstream: asyncio.BaseTransport | None = None
        if self.addon.gate.own.dials_itself(*address) is not None:
            error = "egress-gateway: refusing to connect to itself"
        else:
            self._stage(self.addon.timeouts.connect_s, functools.partial(self._dial_failed, tunnel, True, "timeout"))
            try:
                upstream, _ = await self.loop.create_connection(lambda: UpstreamConnection(self), *address)
            except OSError as exc:
                error = str(exc) or type(exc).__name__
        if self.closed or tunnel.closed_reason is not None:  # e.g. the dial timed out (recorded) or was revoked
            if upstream is not None:
                upstream.close()
            return
        if upstream is None:
            self._dial_failed(tunnel, False, error or "no transport")
            return
        if self.transport is None:
            upstream.close()
            return
        self.upstream = cast(asyncio.Transport, upstream)
        tunnel.record.event("upstream_connected")
        if tunnel.ready:  # the checked first bytes
            tunnel.bytes_sent += len(tunnel.ready)
            self.upstream.write(bytes(tunnel.ready))
            tunnel.ready.clear()
        self._on_data = self._relay
        if self.buffer:  # arrived during the dial: not inspected yet
            held = bytes(self.buffer)
            self.buffer.clear()
            self._relay(held)
            if self.closed or tunnel.closed_reason is not None:
                return
        self._arm_idle_timer()
        self.transport.resume_reading()

    def _relay(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        if not tunnel.inspector.done:  # a later ClientHello (after a HelloRetryRequest) or HTTP request head
            released = self.addon.tunnel_bytes(tunnel, data)
            if released is None:
                self.abort()
                return
            data = released
        tunnel.bytes_sent += len(data)
        if self.upstream is not None and data:
            self.upstream.write(data)
        self.last_activity = self.loop.time()

    def _hold(self, data: bytes = b"") -> None:
        """Stop reading from the client while a decision or a connect is pending; keep what already arrived."""
        self.buffer += data
        self._on_data = self._hold
        if self.transport is not None:
            self.transport.pause_reading()

    # ---- transparent mode: the first message names the destination ----------------------------------------------
    def _read_first_message(self, data: bytes) -> None:
        inspector = self.first
        if inspector is None:
            self.abort()
            return
        inspection = inspector.client_data(data)
        self.first_release += inspection.release
        if not inspection.seen:
            return  # the ClientHello (or request head) is not complete yet; the request timer runs
        complete = Inspection(release=bytes(self.first_release), seen=inspection.seen)
        self.first_release.clear()
        self._hold()
        self.listener.spawn(self._decide_transparent(inspector, complete), self)

    async def _decide_transparent(self, inspector: TunnelInspector, inspection: Inspection) -> None:
        state, transparent = self.state, self.listener.transparent
        if state is None or transparent is None:
            return
        opened = await self.addon.open_transparent(state, transparent, inspector, inspection, self.original)
        if self.closed:
            return
        if isinstance(opened, Decision):
            if transparent.tls:
                self.abort()
            else:
                self.answer_and_close(http1.assemble_response(responses.denial(opened)))
            return
        self.tunnel = opened
        if not self.addon.start_inspected(opened, inspection) or opened.verdict.address is None:
            self.abort()  # the first message was denied (recorded); nothing was sent upstream
            return
        await self._connect(opened)

    # ---- hand-over to mitmproxy -----------------------------------------------------------------------------
    def _hand_over(self) -> None:
        """Not a CONNECT: mitmproxy's HTTP engine serves the requests. The connection stays this object's:
        registered, admitted and timed as before, closed by `abort` like any other; its client bytes still arrive
        here first (`plain_bytes`), so every request head is checked before mitmproxy parses it, and mitmproxy
        writes through `EngineTransport`, which the session can detach (`_take_back`)."""
        transport = self.transport
        if transport is None:
            return
        if starts_like_tls(bytes(self.buffer)):  # TLS to the proxy itself is not offered
            self.abort()
            return
        self.closed = True  # no more protocol callbacks here: the stream protocol below gets them
        self.plain = TunnelInspector(self.addon.head_limits, http=True)
        reader = asyncio.StreamReader(loop=self.loop)
        self.engine = EngineTransport(transport, self)
        self.engine_stream = _PlainHttpStream(self, reader, self.loop)
        transport.set_protocol(self.engine_stream)
        self.engine_stream.connection_made(self.engine)
        early = bytes(self.buffer)
        self.buffer.clear()
        writer = asyncio.StreamWriter(self.engine, self.engine_stream, reader, self.loop)
        self._arm_idle_timer()  # the one idle timer: client bytes in `plain_bytes`, bytes to it in EngineTransport
        self.listener.spawn(self._serve_http(reader, writer))  # runs to its first read; its `finally` stops the timer
        self.engine_stream.data_received(early)

    def plain_bytes(self, data: bytes) -> bytes | None:
        """Plain-HTTP client bytes through the session's inspector: what mitmproxy may read now, or None: a request
        head was refused (answered, recorded, closing). At a CONNECT the session takes the connection back: the
        requests before it go to mitmproxy, the CONNECT and what follows wait here until their responses are out."""
        self.last_activity = self.loop.time()
        if self.engine is not None and self.engine.held:
            self._hold(data)
            return b""
        inspector = self.plain
        if inspector is None or inspector.done:  # after an upgrade: the tunnel's own checks apply
            return data
        inspection = inspector.client_data(data)
        for seen in inspection.seen:
            if seen.request is not None and seen.request.method == "CONNECT" and self.engine is not None:
                self.engine.held = True
                self._hold(inspection.release[seen.at :])
                if not self.answers_due:
                    self.loop.call_soon(self._take_back)
                return inspection.release[: seen.at]
            refusal = self.addon.plain_http_refusal(self.id, seen)
            if refusal is not None:
                self.answer_and_close(refusal)
                return None
            if seen.request is not None:
                self.answers_due += 1
        return inspection.release

    def engine_answered(self) -> None:
        """mitmproxy's `response` (or `error`) hook for one of this session's requests has run. Its end of message
        is written when the hook returns (the hook blocks mitmproxy's HTTP layer), before this call_soon runs."""
        self.answers_due = max(0, self.answers_due - 1)
        if not self.answers_due and self.engine is not None and self.engine.held:
            self.loop.call_soon(self._take_back)

    def _take_back(self) -> None:
        """A CONNECT after plain HTTP, every earlier response written: mitmproxy's handler sees its client leave
        (and ends, closing its upstream) while the socket stays open; the CONNECT goes the way of any CONNECT."""
        transport, engine, stream = self.transport, self.engine, self.engine_stream
        if transport is None or engine is None or stream is None or engine.detached or transport.is_closing():
            return
        engine.detached = True
        self._stop_timer()  # the CONNECT's stages arm it again
        stream.connection_lost(None)  # EOF for mitmproxy's reader, and its pending drains end
        self.plain = None
        self.closed = False
        transport.set_protocol(self)
        self._on_data = self._read_head
        transport.resume_reading()
        self._read_head(b"")

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.listener.hand_over(reader, writer, self)
        finally:
            if self.engine is None or not self.engine.detached:
                self._stop_timer()
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.close()
                self.addon.client_gone(self.id)

    def held_input(self) -> tuple[int, Held]:
        """The client bytes of a request (or first message) not complete yet: what the request timeout records."""
        inspector = self.plain or self.first
        if inspector is not None:
            return inspector.held, inspector.held_shape()
        return len(self.buffer), Held.PARTIAL_HTTP_REQUEST if self.buffer else Held.NOTHING

    # ---- closing --------------------------------------------------------------------------------------------
    def answer_and_close(self, answer: bytes) -> None:
        self._on_data = _discard
        if self.transport is not None:
            self.transport.write(answer)
            self.transport.close()

    def abort(self) -> None:
        """Close now (revocation, timeouts, a tunnel that must not open): buffered data is dropped."""
        self._on_data = _discard
        if self.upstream is not None:
            self.upstream.abort()
        if self.transport is not None:
            self.transport.abort()

    # ---- timers: one handle for the stages of a tunnel (and the idle time of plain HTTP) ---------------------
    def _stage(self, timeout_s: float, expired: Callable[[], None]) -> None:
        """`expired` runs if this stage lasts `timeout_s` from now. A handle that fires no later is kept (it waits
        again until the deadline): a short tunnel arms one timer for its ClientHello, dial and relay."""
        self.deadline = self.loop.time() + timeout_s
        self.expired = expired
        if self.timer is None or self.timer.when() > self.deadline:
            self._stop_timer()
            self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def _on_timer(self) -> None:
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.timer = None
        self.expired()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _dial_failed(self, tunnel: Tunnel, timed_out: bool, error: str) -> None:
        self.addon.tunnel_connect_failed(tunnel, timed_out, error)
        self.abort()  # a dial still pending is cancelled when the connection is lost

    def _arm_idle_timer(self) -> None:
        """`timeouts.idle_s` from now, checked again from the time of the last byte (not per chunk)."""
        self.last_activity = self.loop.time()
        self._stage(self.listener.idle_timeout_s, self._idle_expired)

    def _idle_expired(self) -> None:
        idle = self.loop.time() - self.last_activity
        if idle < self.listener.idle_timeout_s:
            self._stage(self.listener.idle_timeout_s - idle, self._idle_expired)
            return
        log.info("tunnel_idle_timeout", client=self.peer, idle_s=round(idle, 1))
        self.abort()


class _PlainHttpStream(asyncio.StreamReaderProtocol):
    """The stream mitmproxy reads a plain-HTTP connection from: only the bytes the session released."""

    def __init__(self, session: Session, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(reader, loop=loop)
        self.session = session

    def data_received(self, data: bytes) -> None:
        try:
            released = self.session.plain_bytes(data)
        except Exception:  # a bug must cost this connection only, and be visible
            log.exception("plain_http_failed", client=self.session.peer)
            self.session.abort()
            return
        if released:
            super().data_received(released)


class UpstreamConnection(asyncio.Protocol):
    """The destination side of a tunnel: everything it sends goes to the client, with the client's flow control."""

    def __init__(self, client: Session) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        client = self.client
        tunnel = client.tunnel
        if tunnel is not None:
            tunnel.bytes_received += len(data)
            if not tunnel.inspector.done:
                tunnel.inspector.server_data(data)
        if client.transport is not None:
            client.transport.write(data)
        client.last_activity = client.loop.time()

    def eof_received(self) -> bool:
        client = self.client
        client.upstream_eof = True
        transport = client.transport
        if transport is None or client.client_eof:
            if transport is not None:
                transport.close()
            return False
        if transport.can_write_eof():
            transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()  # after what is buffered for the client has been sent

    def pause_writing(self) -> None:  # the destination reads slower than the client sends
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None and not self.client.closed:
            self.client.transport.resume_reading()


def _discard(data: bytes) -> None:
    pass


def _nothing() -> None:
    pass
