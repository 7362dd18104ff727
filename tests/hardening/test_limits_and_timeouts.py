"""Limits and timeouts of the running gateway: `limits.max_connections` (503), `limits.namespace_rate` (429 +
Retry-After), the upstream connect timeout (504), the idle-tunnel timeout, and a client that never reads."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.hardening.conftest import (
    BLACKHOLE_ORIGIN,
    BULK_ORIGIN,
    POLICIES,
    TLS_ORIGIN,
    Env,
    gateway_config,
    hostile_source,
    rss_bytes,
)
from tests.proxy.conftest import PAYMENTS_POD, closed_by_peer, connect, raw_request, tls_through
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer, RawTcpOrigin
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow


def _get_over_tls(tls: Any, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
    return bytes(tls.recv(65536))


# ---- limits.max_connections -----------------------------------------------------------------------------------------


def test_max_connections_answers_503_and_spares_open_tunnels(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer], ca: TestCA
) -> None:
    origin = make_origin(TLS_ORIGIN, ca.issue("allowed.test").server_context())
    # No per-namespace share here (it equals the whole): this is about the global limit; shares are in
    # test_namespace_connections.py.
    limits = {"max_connections": 3, "namespace_connections": 3}
    gateway = make_gateway(gateway_config(limits=limits), POLICIES)
    source = hostile_source()
    tunnels = [tls_through(connect(gateway.proxy_port, f"allowed.test:{origin.port}", source), ca, "allowed.test")]
    tunnels += [tls_through(connect(gateway.proxy_port, f"allowed.test:{origin.port}", source), ca, "allowed.test")]
    tunnels += [tls_through(connect(gateway.proxy_port, f"allowed.test:{origin.port}", source), ca, "allowed.test")]
    over = connect(gateway.proxy_port, f"allowed.test:{origin.port}", PAYMENTS_POD)
    assert over.status == 503
    assert over.body.startswith(b"connection_limit: the gateway already serves 3 connections")
    assert over.headers["proxy-status"].startswith("egress-gateway; error=connection_limit_reached")
    assert closed_by_peer(over.sock)
    gateway.wait_for(
        "egress_decision",
        lambda e: e.get("client.address") == PAYMENTS_POD and e.get("egress.reason") == "connection_limit",
    )
    for index, tls in enumerate(tunnels):  # the tunnels already open are unharmed
        assert _get_over_tls(tls, f"/open-{index}").startswith(b"HTTP/1.1 200")
    tunnels.pop().close()
    deadline = time.monotonic() + 10
    status = 0
    while time.monotonic() < deadline:
        answer = connect(gateway.proxy_port, f"allowed.test:{origin.port}", PAYMENTS_POD)
        status = answer.status
        answer.sock.close()
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200, "a freed slot is served again"
    for tls in tunnels:
        tls.close()


# ---- limits.namespace_rate ------------------------------------------------------------------------------------------


def test_namespace_rate_limit_answers_429_with_retry_after_and_spares_other_namespaces(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer], ca: TestCA
) -> None:
    origin = make_origin(TLS_ORIGIN, ca.issue("allowed.test").server_context())
    rate = {"namespace_rate": {"per_second": 0.5, "burst": 3}}
    gateway = make_gateway(gateway_config(limits=rate), POLICIES)
    source = hostile_source()
    for _ in range(3):
        answer = connect(gateway.proxy_port, f"allowed.test:{origin.port}", source)
        assert answer.status == 200
        answer.sock.close()
    before = origin.accepted
    limited = connect(gateway.proxy_port, f"allowed.test:{origin.port}", source)
    assert limited.status == 429
    assert limited.headers["retry-after"] == "2"
    assert limited.body.startswith(b"rate_limited: namespace hostile exceeds 0.5 new connections/s with a burst of 3")
    assert limited.headers["proxy-status"].startswith("egress-gateway; error=connection_limit_reached")
    plain = raw_request(gateway.proxy_port, b"GET http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\n\r\n", source)
    assert plain.status == 429 and plain.headers["retry-after"] in ("1", "2")
    record = gateway.wait_for(
        "egress_decision", lambda e: e.get("client.address") == source and e.get("egress.reason") == "rate_limited"
    )
    assert record["k8s.namespace.name"] == "hostile"
    assert origin.accepted == before
    other = connect(gateway.proxy_port, f"allowed.test:{origin.port}", PAYMENTS_POD)  # namespace shop: own bucket
    assert other.status == 200
    time.sleep(2.1)
    again = connect(gateway.proxy_port, f"allowed.test:{origin.port}", source)
    assert again.status == 200, "a token is back after Retry-After"


# ---- timeouts --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def blackhole_listener() -> Iterator[int]:
    """A loopback listener with a full accept queue: further connects get no SYN-ACK and hang."""
    listener = socket.socket()
    listener.bind((BLACKHOLE_ORIGIN, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((BLACKHOLE_ORIGIN, port))
            fillers.append(filler)
        time.sleep(0.2)
        probe = socket.socket()
        probe.settimeout(1.0)
        try:
            probe.connect((BLACKHOLE_ORIGIN, port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes connects beyond the accept queue; cannot simulate a hanging upstream")
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_upstream_that_never_accepts_gets_504_connection_timeout(env: Env) -> None:
    source = env.fresh_source()
    with blackhole_listener() as port:
        started = time.monotonic()
        answer = raw_request(
            env.gateway.proxy_port,
            f"GET http://blackhole.test:{port}/ HTTP/1.1\r\nHost: blackhole.test:{port}\r\n\r\n".encode(),
            source,
            timeout=20,
        )
        elapsed = time.monotonic() - started
    assert answer.status == 504, answer.body
    assert answer.body.startswith(b"connection_timeout: ")
    assert answer.headers["proxy-status"].startswith("egress-gateway; error=connection_timeout")
    assert 2.5 < elapsed < 3 + 4  # timeouts.connect_s = 3
    env.decision(source, "connection_timeout")
    env.assert_still_serves()


def test_plain_http_to_a_closed_port_gets_502_connection_refused_with_a_record(env: Env) -> None:
    source = env.fresh_source()
    closed = socket.socket()
    closed.bind((BULK_ORIGIN, 0))
    port = closed.getsockname()[1]
    closed.close()
    answer = raw_request(
        env.gateway.proxy_port,
        f"GET http://bulk.test:{port}/ HTTP/1.1\r\nHost: bulk.test:{port}\r\n\r\n".encode(),
        source,
    )
    assert answer.status == 502
    assert answer.body.startswith(b"connection_refused: cannot connect to 127.0.0.13:")
    assert answer.headers["proxy-status"].startswith("egress-gateway; error=connection_refused")
    env.decision(source, "connection_refused")
    env.assert_still_serves()


def test_tunnel_to_an_upstream_that_never_accepts_is_closed_with_connection_timeout(env: Env) -> None:
    source = env.fresh_source()
    with blackhole_listener() as port:
        answer = connect(env.gateway.proxy_port, f"blackhole.test:{port}", source)
        assert answer.status == 200
        started = time.monotonic()
        answer.sock.sendall(b"GET / HTTP/1.1\r\nHost: blackhole.test\r\n\r\n")
        assert closed_by_peer(answer.sock, timeout=15)
        elapsed = time.monotonic() - started
    # timeouts.connect_s = 3 from the dial, which starts once the request head is checked: the session's one timer
    # (armed at the 200 for client_hello_s = 3) fires first and waits again until the dial's own deadline
    assert 2.5 < elapsed < 3 + 4, elapsed
    env.decision(source, "connection_timeout")
    env.assert_still_serves()


def test_idle_tunnel_is_closed_after_idle_timeout(env: Env) -> None:
    source = env.fresh_source()
    answer = connect(env.gateway.proxy_port, f"plain.test:{env.plain.port}", source)
    assert answer.status == 200
    answer.sock.sendall(b"GET /idle HTTP/1.1\r\nHost: plain.test\r\n\r\n")
    assert answer.sock.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert closed_by_peer(answer.sock, timeout=15)
    idle = time.monotonic() - started
    assert 3 < idle < 4 + 4, idle  # timeouts.idle_s = 4
    env.wait_decision(
        source,
        lambda e: e.get("egress.decision") == "allow",
    )


# ---- a client that never reads ---------------------------------------------------------------------------------------


class BulkOrigin(RawTcpOrigin):
    """Accepts TCP connections and writes 64 KiB chunks as fast as the peer takes them; counts what was taken."""

    threaded = True

    def __init__(self) -> None:
        self.sent = 0
        super().__init__(BULK_ORIGIN)

    def handle(self, conn: socket.socket) -> None:
        chunk = b"x" * 65536
        conn.settimeout(0.5)
        with conn:
            while not self.stopping:
                try:
                    self.sent += conn.send(chunk)
                except TimeoutError:
                    continue
                except OSError:
                    return


def test_client_that_never_reads_does_not_make_the_gateway_buffer(env: Env) -> None:
    assert env.gateway.process is not None
    pid = env.gateway.process.pid
    bulk = BulkOrigin()
    try:
        source = env.fresh_source()
        rss_before = rss_bytes(pid)
        answer = connect(env.gateway.proxy_port, f"bulk.test:{bulk.port}", source)
        assert answer.status == 200
        answer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        answer.sock.sendall(b"go\r\n")  # first bytes: the upstream is dialed; then this client never reads
        time.sleep(3)
        sent_early = bulk.sent
        time.sleep(0.5)
        env.assert_still_serves()
        growth = rss_bytes(pid) - rss_before
        assert bulk.sent - sent_early < 1024 * 1024, "backpressure: the origin is stalled, not drained into memory"
        assert bulk.sent < 32 * 1024 * 1024, bulk.sent
        assert growth < 48 * 1024 * 1024, growth
        answer.sock.close()
    finally:
        bulk.stop()
