"""The registry of live sessions and the checks that enforce decisions, as plain methods the sessions (and the
plain-HTTP engine's hooks, `http_engine.py`) call.

Owns the per-connection state (`ClientState`, `Tunnel`), the request-head checks (`read_head`), the CONNECT decision
(`open_tunnel`), the checks of what a tunnel carries (`start_tunnel` for its first bytes, `tunnel_bytes` for every
client chunk until its `TunnelInspector` is done: each ClientHello, HTTP request head, or opaque bytes), the client
timers (request, ClientHello) and revocation of open tunnels after a policy change or a change of the clients' labels.
TLS is never terminated. Imports mitmproxy's HTTP message types and parser, the gate, the recorder contract and the
decision types; never the policy sources.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog
from mitmproxy import http
from mitmproxy.net.http import http1, url

from egress_gateway.audit.recorder import ConnectionRecord, Recorder
from egress_gateway.policy.decision import Decision, Facts, Identity, IPAddress, Reason, adapter_denial
from egress_gateway.policy.model import Protocol as WireProtocol
from egress_gateway.proxy import responses
from egress_gateway.proxy.admission import Admission
from egress_gateway.proxy.gate import Gate, Verdict, same_host
from egress_gateway.proxy.limits import NamespaceRateLimiter
from egress_gateway.proxy.transparent import Transparent
from egress_gateway.wire.heads import HeadLimits
from egress_gateway.wire.inspection import Held, Inspection, Seen, TunnelInspector
from egress_gateway.wire.request_head import Malformed, request_form_problem
from egress_gateway.wire.request_head import read_head as read_request_head


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 10.0
    client_hello_s: float = 10.0
    client_request_s: float = 30.0


@dataclass(eq=False, slots=True)
class Tunnel:
    """A CONNECT tunnel from its 200 until the client leaves."""

    record: ConnectionRecord
    verdict: Verdict
    inspector: TunnelInspector
    opened: bool = False  # the ClientHello/first bytes were checked and the upstream was allowed
    checked: bool = False  # the first thing the tunnel carries (ClientHello, request head, opaque bytes) was allowed
    hellos: int = 0  # ClientHellos checked
    first_sni: str | None = None  # of the first ClientHello; a later one (after a HelloRetryRequest) must repeat it
    ready: bytearray = field(default_factory=bytearray)  # checked client bytes waiting for the upstream connection
    closed_reason: Reason | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


class Owner(Protocol):
    """The session that owns a client connection (`session.py`): what the checks may do to the connection."""

    def abort(self) -> None: ...

    def held_input(self) -> tuple[int, Held]:
        """The client bytes of a request not complete yet, and what they look like."""
        ...


@dataclass(eq=False, slots=True)
class ClientState:
    """A session's admission and decision state; `GatewayAddon.clients` (id -> state) is the one registry of live
    sessions: revocation, limits, timers and the shutdown drain find a connection there."""

    client_id: str
    address: str
    port: int
    owner: Owner
    tunnel: Tunnel | None = None
    request_seen: bool = False
    request_timer: asyncio.TimerHandle | None = None
    refused: Decision | None = None  # over `limits.max_connections`: every request on it gets this answer
    retry_after: str | None = None  # Retry-After of the latest rate-limited request


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


class GatewayAddon:
    def __init__(
        self,
        gate: Gate,
        recorder: Recorder,
        timeouts: Timeouts,
        max_connections: int,
        log: Any = None,
        rate: NamespaceRateLimiter | None = None,
        head_limits: HeadLimits | None = None,
        namespace_connections: int | None = None,
    ) -> None:
        self.gate = gate
        self.recorder = recorder
        self.timeouts = timeouts
        self.admission = Admission(gate, max_connections, namespace_connections, rate)
        self.head_limits = head_limits if head_limits is not None else HeadLimits()
        self.log = log or structlog.get_logger("egress_gateway.proxy")
        self.clients: dict[str, ClientState] = {}  # session id -> state
        self._ids = itertools.count(1)

    # ---- connection lifecycle ------------------------------------------------------------------------------
    def open_client(self, host: str, port: int, owner: Owner) -> ClientState:
        """A new client connection (its session, at accept): its id, registration, admission and request timer."""
        client_id = f"conn-{next(self._ids)}"
        state = ClientState(client_id, host, port, owner)
        # Over a limit: read the request and answer 503 (with Proxy-Status), so the client learns why; tunnels
        # already open are untouched. The request timer below bounds how long such a connection may stay.
        state.refused = self.admission.at_accept(client_id, host)
        self.await_request(state)
        self.clients[client_id] = state
        return state

    def await_request(self, state: ClientState) -> None:
        """The next request head must arrive within `client_request_s` (at accept, and after each plain-HTTP response:
        no slowloris on a kept-alive connection)."""
        state.request_seen = False
        _cancel(state.request_timer)
        state.request_timer = asyncio.get_running_loop().call_later(
            self.timeouts.client_request_s, self._request_timeout, state
        )

    def request_arrived(self, state: ClientState) -> None:
        state.request_seen = True
        _cancel(state.request_timer)

    def close_client(self, client_id: str) -> bool:
        """Close one client connection now (revocation, timers, drain). False if it is already gone."""
        state = self.clients.get(client_id)
        if state is not None:
            state.owner.abort()
        return state is not None

    def client_gone(self, client_id: str) -> None:
        """The client connection closed: release its slot, stop its timers, close its tunnel's record."""
        state = self.clients.pop(client_id, None)
        self.admission.release(client_id)
        if state is None:
            return
        _cancel(state.request_timer)
        tunnel = state.tunnel
        if tunnel is not None:
            tunnel.record.event("closed")
            tunnel.record.close(bytes_sent=tunnel.bytes_sent, bytes_received=tunnel.bytes_received)

    def _request_timeout(self, state: ClientState) -> None:
        if not state.request_seen:
            held, shape = state.owner.held_input()
            self.log.info(
                "client_request_timeout",
                client=state.address,
                timeout_s=self.timeouts.client_request_s,
                received_bytes=held,
                received=shape.value,
            )
            self.close_client(state.client_id)

    # ---- what a tunnel carries -------------------------------------------------------------------------------
    def start_tunnel(self, tunnel: Tunnel, data: bytes) -> bool | None:
        """Check a tunnel's first client bytes (`data`: the bytes that arrived since the last call). True: the
        tunnel may dial `tunnel.verdict.address` and send `tunnel.ready` first; False: close the client (the
        decision is recorded); None: wait for more bytes."""
        return self._started(tunnel, self.tunnel_bytes(tunnel, data))

    def _started(self, tunnel: Tunnel, released: bytes | None) -> bool | None:
        if released is None:
            return False
        tunnel.ready += released
        if not tunnel.checked:
            return None  # the ClientHello (or request head) is not complete yet; its timer runs
        if tunnel.verdict.address is None:
            return False
        tunnel.opened = True
        return True

    def tunnel_bytes(self, tunnel: Tunnel, data: bytes) -> bytes | None:
        """A tunnel's client bytes through its inspection (`TunnelInspector`): the bytes that may go upstream now
        (possibly none: a message is incomplete), or None: close the tunnel (the denial is recorded). Both paths
        call it for every client chunk until `tunnel.inspector.done`."""
        if tunnel.closed_reason is not None:
            return None
        return self._checked_inspection(tunnel, tunnel.inspector.client_data(data))

    def _checked_inspection(self, tunnel: Tunnel, inspection: Inspection) -> bytes | None:
        if tunnel.closed_reason is not None:
            return None
        for seen in inspection.seen:
            if not self._check_seen(tunnel, seen):
                return None
        return inspection.release

    def _check_seen(self, tunnel: Tunnel, seen: Seen) -> bool:
        """Decide one thing the tunnel carries; record it (every denial, and the first allow); False: deny."""
        verdict = tunnel.verdict  # each branch's decision sets `facts.protocol` (the SNI's to TLS, a Host's to HTTP)
        record = tunnel.record
        if seen.problem is not None:
            facts = replace(verdict.facts, protocol=seen.protocol)
            verdict = Verdict(facts, adapter_denial(Reason.BAD_REQUEST, seen.problem), verdict.candidates)
        elif seen.hello is not None:
            hello = seen.hello
            record.set(tls=True, tls_client_server_name=hello.sni, tls_alpn=hello.alpn or None, tls_ech=hello.ech)
            record.event("client_hello")
            if tunnel.hellos and not _same_sni(tunnel.first_sni, hello.sni):
                verdict = Verdict(
                    replace(verdict.facts, sni=hello.sni, protocol=seen.protocol),
                    adapter_denial(
                        Reason.SNI_MISMATCH,
                        f"the ClientHello after a HelloRetryRequest names {hello.sni!r}; the first named "
                        f"{tunnel.first_sni!r} (a tunnel's SNI cannot change)",
                    ),
                    verdict.candidates,
                )
            else:
                if not tunnel.hellos:
                    tunnel.first_sni = hello.sni
                verdict = self.gate.decide_sni(verdict, hello.sni)
            tunnel.hellos += 1
        elif seen.request is not None:
            record.set(tls=False)
            record.event("http_request")
            verdict = self._decide_request(verdict, seen.request)
        else:
            record.set(tls=False)
            verdict = self.gate.decide_protocol(verdict, seen.protocol)
        first = not tunnel.checked
        tunnel.verdict = verdict
        if first or not verdict.decision.allowed:
            record.decided(verdict.facts, verdict.decision)
        if not verdict.decision.allowed:
            tunnel.closed_reason = verdict.decision.reason
            return False
        tunnel.checked = True
        return True

    def _decide_request(self, verdict: Verdict, request: http.Request) -> Verdict:
        """An HTTP/1 request inside a tunnel: its Host (and absolute-form authority) checked like plain HTTP."""
        hosts = request.headers.get_all("host")
        if len(hosts) != 1:
            problem = "without a Host header" if not hosts else "with more than one Host header"
            facts = replace(verdict.facts, protocol=WireProtocol.HTTP)
            denial = adapter_denial(Reason.BAD_REQUEST, f"an HTTP request in the tunnel {problem}")
            return Verdict(facts, denial, verdict.candidates)
        names = [hosts[0]]
        if request.authority and request.authority != hosts[0]:
            names.append(request.authority)
        for name in names:
            verdict = self.gate.decide_host(verdict, name)
            if not verdict.decision.allowed:
                break
        return verdict

    def plain_http_refusal(self, client_id: str, seen: Seen) -> bytes | None:
        """One request head of a plain-HTTP connection, as the session's inspector reported it: the refusal to send
        before closing (414/431/400, recorded like any denial), or None: mitmproxy may parse and serve it."""
        if seen.problem is not None:
            head = seen.head or b""
            checked = self.read_head(client_id, head) if head else None
            if isinstance(checked, bytes):
                return checked
            return self._refuse_head(client_id, head, adapter_denial(Reason.BAD_REQUEST, seen.problem))
        if seen.request is not None and (problem := request_form_problem(seen.request)) is not None:
            decision = adapter_denial(Reason.BAD_REQUEST, f"malformed request: {problem}")
            return self._refuse_head(client_id, seen.request.method.encode("ascii", "replace"), decision)
        return None

    def read_head(self, client_id: str, head: bytes) -> bytes | http.Request | None:
        """Check a request head as received so far (`wire/request_head.py`). bytes: the refusal to send before closing
        (recorded like any denial); a `Request`: the head is complete and valid; None: acceptable so far, wait."""
        checked = read_request_head(head, self.head_limits)
        if checked is None or isinstance(checked, http.Request):
            return checked
        if isinstance(checked, Malformed):
            return self._refuse_head(client_id, head, adapter_denial(Reason.BAD_REQUEST, checked.message))
        reason = Reason.URI_TOO_LONG if checked.status == 414 else Reason.HEADERS_TOO_LARGE
        return self._refuse_head(client_id, head, adapter_denial(reason, checked.message))

    def _refuse_head(self, client_id: str, head: bytes, decision: Decision) -> bytes:
        state = self.clients.get(client_id)
        if state is not None:
            self.request_arrived(state)
        method = head.split(b" ", 1)[0]
        kind = method.decode("ascii") if method.isalpha() and method.isupper() and len(method) <= 16 else "HTTP"
        record = self.recorder.open(kind, state.address if state else "", state.port if state else 0)
        record.decided(Facts(identity=None, target="", port=0), decision)
        response = responses.denial(decision)
        record.set(http_response_status_code=response.status_code)
        record.close()
        return http1.assemble_response(response)

    def hello_timed_out(self, state: ClientState) -> None:
        """`timeouts.client_hello_s` passed since the 200 (the session's timer) without a complete first message."""
        tunnel = state.tunnel
        if tunnel is None or tunnel.opened or tunnel.closed_reason is not None:
            return
        tunnel.closed_reason = Reason.CLIENT_TIMEOUT
        received, shape = tunnel.inspector.received, tunnel.inspector.held_shape()
        sent = f"{received} bytes, {shape.description}," if received else "no data"
        decision = adapter_denial(
            Reason.CLIENT_TIMEOUT,
            f"the client sent {sent} within {self.timeouts.client_hello_s:g} s after the tunnel was established",
        )
        tunnel.record.set(timeout="client_hello", timeout_received_bytes=received, timeout_received=shape.value)
        tunnel.record.decided(tunnel.verdict.facts, decision)
        self.close_client(state.client_id)

    # ---- CONNECT --------------------------------------------------------------------------------------------
    async def open_tunnel(self, state: ClientState, request: http.Request) -> http.Response | None:
        """Decide a CONNECT. Allowed: the client's `Tunnel` is set up (the session times its ClientHello) and None is
        returned; denied: the response to send before closing (the record is complete). A client that left while
        the decision was pending gets its record completed and no tunnel."""
        self.request_arrived(state)
        record = self.recorder.open("CONNECT", state.address, state.port)
        try:
            verdict = await self.decide(state, record, request, host_header=None)
        except BaseException:
            record.close()
            raise
        if not verdict.decision.allowed:
            return self.refusal(state, record, verdict.decision)
        self.tunnel_for(state, record, verdict, TunnelInspector(self.head_limits))
        return None

    def tunnel_for(
        self, state: ClientState, record: ConnectionRecord, verdict: Verdict, inspector: TunnelInspector
    ) -> Tunnel | None:
        """The allowed tunnel of a client, or None: the client left while the decision was pending (recorded)."""
        if self.clients.get(state.client_id) is not state:
            record.event("closed")
            record.close()
            return None
        tunnel = Tunnel(record=record, verdict=verdict, inspector=inspector)
        state.tunnel = tunnel
        return tunnel

    # ---- transparent mode (name-routed listeners) -----------------------------------------------------------
    async def open_transparent(
        self,
        state: ClientState,
        mode: Transparent,
        inspector: TunnelInspector,
        inspection: Inspection,
        original: IPAddress | None,
    ) -> Tunnel | Decision:
        """A connection to a name-routed listener whose first message (`inspection`) is complete: decided exactly as
        a CONNECT to `name:mode.port`, the name taken from the ClientHello's SNI or the request's Host. Then the
        first message is checked as a CONNECT tunnel's first bytes would be (`start_inspected`). Returns the tunnel,
        or the denial (recorded; the session answers or closes)."""
        self.request_arrived(state)
        record = self.recorder.open("CONNECT", state.address, state.port)
        record.set(egress_mode="transparent", egress_listener=mode.name)
        target = _transparent_target(inspection.seen[0], mode)
        if isinstance(target, Decision):
            record.decided(Facts(identity=None, target="", port=mode.port), target)
            if not mode.tls:
                record.set(http_response_status_code=responses.status_for(target.reason)[0])
            record.close()
            return target
        host, target_port = target
        try:
            verdict = await self._decide_target(state, record, host, target_port, None, None, original)
        except BaseException:
            record.close()
            raise
        if not verdict.decision.allowed:
            if not mode.tls:
                record.set(http_response_status_code=responses.status_for(verdict.decision.reason)[0])
            record.close()
            return verdict.decision
        return self.tunnel_for(state, record, verdict, inspector) or verdict.decision

    def start_inspected(self, tunnel: Tunnel, inspection: Inspection) -> bool | None:
        """`start_tunnel` for bytes the tunnel's inspector has already read (transparent mode)."""
        return self._started(tunnel, self._checked_inspection(tunnel, inspection))

    def connect_failure(self, host: str, port: int, timed_out: bool, error: str | None) -> Decision:
        """Why an upstream dial failed, a tunnel's or plain HTTP's (answered 504 or 502)."""
        if timed_out:
            return adapter_denial(
                Reason.CONNECTION_TIMEOUT, f"{host}:{port} did not accept within {self.timeouts.connect_s:g} s"
            )
        return adapter_denial(Reason.CONNECTION_REFUSED, f"cannot connect to {host}:{port}: {error}")

    def tunnel_connect_failed(self, tunnel: Tunnel, timed_out: bool, error: str) -> None:
        """The session could not reach the tunnel's pinned address."""
        decision = self.connect_failure(str(tunnel.verdict.address), tunnel.verdict.facts.port, timed_out, error)
        tunnel.closed_reason = decision.reason
        tunnel.record.decided(tunnel.verdict.facts, decision)

    # ---- hot reload -----------------------------------------------------------------------------------------
    def revoke(
        self,
        reidentify: Callable[[Identity], Identity | None] | None = None,
        *,
        reason: Reason = Reason.REVOKED,
        cause: str = "a policy change denies this open tunnel",
    ) -> int:
        """Re-decide every open tunnel against the policies now in force; close those that became denied.

        With `reidentify` (the clients' workloads changed, not the policies), each tunnel's identity is first
        replaced by `reidentify(identity)` (None: the client's pod is gone); a tunnel for which it returns the same
        object is not re-decided. Tunnels still allowed keep running with the refreshed identity."""
        revoked = 0
        for state in list(self.clients.values()):
            tunnel = state.tunnel
            if tunnel is None or tunnel.closed_reason is not None:
                continue
            facts = tunnel.verdict.facts
            if reidentify is not None:
                if facts.identity is None:
                    continue
                identity = reidentify(facts.identity)
                if identity is facts.identity:
                    continue
                why = self._reidentified_cause(facts.identity, identity)
                facts = replace(facts, identity=identity)
            else:
                why = cause
            decision = self.gate.redecide(facts)
            if decision.allowed:
                tunnel.verdict = Verdict(facts, decision, tunnel.verdict.candidates)
                continue
            tunnel.closed_reason = reason
            tunnel.record.decided(
                tunnel.verdict.facts,  # the identity that opened it; the message says what changed
                Decision(
                    allowed=False,
                    reason=reason,
                    message=f"{why} ({decision.reason.value}: {decision.message})",
                    policy=decision.policy,
                    rule=decision.rule,
                    matched=decision.matched,
                    tier=decision.tier,
                    deciders=decision.deciders,
                ),
            )
            self.close_client(state.client_id)
            revoked += 1
        return revoked

    @staticmethod
    def _reidentified_cause(before: Identity, after: Identity | None) -> str:
        """Why `revoke(reidentify)` closes a tunnel: the start of its `revoked` message (which labels changed)."""
        if after is None:
            return f"the client's pod {before.namespace}/{before.pod} is gone, which denies this open tunnel"
        changed = []
        for what, old, new in (
            (f"pod {before.namespace}/{before.pod}", before.labels, after.labels),
            (f"namespace {before.namespace}", before.namespace_labels, after.namespace_labels),
        ):
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if keys:
                shown = ", ".join(f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys[:4])
                more = f", {len(keys) - 4} more" if len(keys) > 4 else ""
                changed.append(f"{what} ({shown}{more})")
        if not changed and before.service_account == after.service_account and before.pod_uid != after.pod_uid:
            recreated = f"{before.namespace}/{before.pod} was re-created (UID {before.pod_uid} -> {after.pod_uid})"
            return f"the client's pod {recreated}, which denies this open tunnel"
        if not changed:
            accounts = f"{before.service_account} -> {after.service_account}"
            return f"the client's service account changed ({accounts}), which denies this open tunnel"
        return f"the client's labels changed: {' and '.join(changed)}, which denies this open tunnel"

    # ---- shared -----------------------------------------------------------------------------------------------
    async def decide(
        self, state: ClientState, record: ConnectionRecord, request: http.Request, host_header: str | None
    ) -> Verdict:
        authorization = request.headers.get("Proxy-Authorization")
        return await self._decide_target(state, record, request.host, request.port, host_header, authorization)

    async def _decide_target(
        self,
        state: ClientState,
        record: ConnectionRecord,
        host: str,
        port: int,
        host_header: str | None,
        authorization: str | None,
        original: IPAddress | None = None,
    ) -> Verdict:
        started = time.perf_counter()
        record.set(server_address=host, server_port=port)
        facts = Facts(identity=None, target=host, port=port, host_header=host_header)
        admitted = await self.admission.admit(state.client_id, state.address, state.refused, facts, authorization)
        verdict = self.gate.check_original_destination(admitted.verdict, original)
        if admitted.retry_after is not None:
            state.retry_after = admitted.retry_after
        if verdict.address is not None:
            record.set(network_peer_address=str(verdict.address))
        record.event("decided", duration_s=time.perf_counter() - started)
        record.decided(verdict.facts, verdict.decision)
        return verdict

    def refusal(self, state: ClientState | None, record: ConnectionRecord, decision: Decision) -> http.Response:
        """The denial response for a decided request; completes and closes its record."""
        response = responses.denial(decision)
        if decision.reason is Reason.RATE_LIMITED and state is not None and state.retry_after is not None:
            response.headers["Retry-After"] = state.retry_after
        record.set(http_response_status_code=response.status_code)
        record.close()
        return response


def _same_sni(first: str | None, second: str | None) -> bool:
    if first is None or second is None:
        return first is second
    return first == second or same_host(first, second)


def _transparent_target(first: Seen, mode: Transparent) -> tuple[str, int] | Decision:
    """What a name-routed listener's first message says the destination is: the SNI (TLS) or the Host (HTTP)."""
    if first.problem is not None:
        return adapter_denial(Reason.BAD_REQUEST, first.problem)
    if mode.tls and first.hello is None:
        return adapter_denial(
            Reason.NO_SNI, f"the first bytes are {first.protocol.value}, not TLS: no server name to decide"
        )
    default_port = mode.port
    if first.hello is not None:
        if not first.hello.sni:
            return adapter_denial(
                Reason.NO_SNI, "the ClientHello names no server (no SNI): a transparent connection needs a name"
            )
        return first.hello.sni, default_port
    if first.request is not None:
        hosts = first.request.headers.get_all("host")
        if len(hosts) != 1 or not hosts[0]:
            return adapter_denial(
                Reason.NO_SNI, "the request has no single Host header: a transparent connection needs a name"
            )
        try:
            host, port = url.parse_authority(hosts[0], check=True)
        except ValueError:
            return adapter_denial(Reason.BAD_REQUEST, f"invalid Host header {hosts[0]!r}")
        return host, port if port is not None else default_port
    return adapter_denial(Reason.NO_SNI, f"the first bytes are {first.protocol.value}, not HTTP: no Host to decide")
