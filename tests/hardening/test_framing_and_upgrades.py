"""Issue 12, classes 5 and 6, with real sockets on loopback.

5: a framing header named in `Connection` (`Connection: content-length`, `Connection: transfer-encoding`) would be
stripped as hop-by-hop after the body length was fixed, and the origin would parse the body as a second, undecided
request. Such a request is refused with 400 and a record, on both transports; the origin (a real HTTP parser that
records every request it parses) sees nothing.
6: a plain-HTTP connection upgraded with 101 (a real WebSocket handshake, wsproto on both ends) is a tunnel from
then on: its bytes are counted in its record and a policy edit that denies it closes it with a `revoked` record.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from tests.hardening.conftest import PLAIN_ORIGIN
from tests.proxy.conftest import STATIC_IDENTITIES, closed_by_peer, raw_request
from tests.support.gateway import REPO, GatewayProcess
from tests.support.origins import OriginServer, RawTcpOrigin

WS_ORIGIN = "127.0.0.15"


def policy(*hosts: str) -> str:
    return f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: payments, namespace: shop}}
spec:
  rules:
    - name: origins
      hosts: [{", ".join(hosts)}]
"""


def config(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"hosts": {"plain.test": [PLAIN_ORIGIN], "ws.test": [WS_ORIGIN], "other.test": [PLAIN_ORIGIN]}},
    }
    base.update(extra)
    return base


# ---- class 5: framing headers are never hop-by-hop -----------------------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: plain.test\r\n\r\n"


def smuggling_request(port: int, connection: str, chunked: bool = False) -> bytes:
    head = f"POST http://plain.test:{port}/first HTTP/1.1\r\nHost: plain.test:{port}\r\nConnection: {connection}\r\n"
    if chunked:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        return head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + body
    return head.encode() + f"Content-Length: {len(SMUGGLED)}\r\n\r\n".encode() + SMUGGLED


@pytest.mark.parametrize(
    ("connection", "chunked"),
    [
        ("content-length", False),
        ("Content-Length", False),
        ("keep-alive, content-length", False),
        ("close,Content-Length ", False),
        ("transfer-encoding", True),
        ("Upgrade, Transfer-Encoding", True),
        ("host", False),
    ],
)
def test_a_framing_header_named_in_connection_is_refused_with_400_and_never_reaches_the_origin(
    make_gateway: Callable[..., GatewayProcess],
    make_origin: Callable[..., OriginServer],
    connection: str,
    chunked: bool,
) -> None:
    origin = make_origin(PLAIN_ORIGIN, name="plain")
    gateway = make_gateway(config(), {"shop.yaml": policy("plain.test")})
    answer = raw_request(gateway.proxy_port, smuggling_request(origin.port, connection, chunked))
    with answer.sock as sock:
        assert answer.status == 400, answer.body
        assert answer.body.startswith(b"bad_request: ") and b"can never be hop-by-hop" in answer.body
        assert closed_by_peer(sock, timeout=5)
    time.sleep(0.3)
    assert origin.requests == []  # neither the POST nor the smuggled GET
    record = gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "bad_request")
    assert "Connection header names" in record["egress.message"]


def test_the_same_refusal_on_a_reused_connection_after_an_allowed_request(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer]
) -> None:
    origin = make_origin(PLAIN_ORIGIN, name="plain")
    gateway = make_gateway(config(), {"shop.yaml": policy("plain.test")})
    first = f"GET http://plain.test:{origin.port}/ok HTTP/1.1\r\nHost: plain.test:{origin.port}\r\n\r\n".encode()
    answer = raw_request(gateway.proxy_port, first)
    with answer.sock as sock:
        assert answer.status == 200
        sock.sendall(smuggling_request(origin.port, "content-length"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 400 "), data
    time.sleep(0.3)
    assert [r["path"] for r in origin.requests] == ["/ok"]


def test_a_connect_naming_a_framing_header_in_connection_is_refused(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer]
) -> None:
    origin = make_origin(PLAIN_ORIGIN, name="plain")
    gateway = make_gateway(config(), {"shop.yaml": policy("plain.test")})
    request = (
        f"CONNECT plain.test:{origin.port} HTTP/1.1\r\nHost: plain.test:{origin.port}\r\n"
        "Connection: content-length\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    answer = raw_request(gateway.proxy_port, request)
    answer.sock.close()
    assert answer.status == 400 and b"can never be hop-by-hop" in answer.body
    assert origin.accepted == 0


# ---- class 6: upgraded connections are tunnels ----------------------------------------------------------------------


class WebSocketOrigin(RawTcpOrigin):
    """A WebSocket echo server (wsproto) that counts the messages it received."""

    threaded = True

    def __init__(self, host: str) -> None:
        self.messages: list[str] = []
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        with conn:
            while not self.stopping:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        conn.sendall(ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        self.messages.append(event.data)
                        conn.sendall(ws.send(TextMessage(data=f"echo {event.data}")))
                    elif isinstance(event, CloseConnection):
                        conn.sendall(ws.send(event.response()))
                        return


def websocket_through_proxy(proxy_port: int, origin_port: int) -> tuple[socket.socket, WSConnection]:
    """A WebSocket client (wsproto) whose handshake goes through the proxy as a plain-HTTP (absolute-form) request."""
    ws = WSConnection(ConnectionType.CLIENT)
    handshake = ws.send(Request(host=f"ws.test:{origin_port}", target="/chat"))
    handshake = handshake.replace(b"GET /chat ", f"GET http://ws.test:{origin_port}/chat ".encode(), 1)
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10, source_address=("127.0.0.2", 0))
    sock.sendall(handshake)
    accepted = False
    while not accepted:
        data = sock.recv(65536)
        assert data, "the proxy closed the connection during the WebSocket handshake"
        ws.receive_data(data)
        for event in ws.events():
            assert isinstance(event, AcceptConnection), event
            accepted = True
    return sock, ws


def exchange(sock: socket.socket, ws: WSConnection, text: str) -> str:
    sock.sendall(ws.send(TextMessage(data=text)))
    while True:
        data = sock.recv(65536)
        assert data, "closed"
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                return str(event.data)


def trail_spans(trail: Path, host: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "egress_gateway", "audit", str(trail), "--host", host, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_an_upgraded_websocket_is_revoked_like_a_tunnel_and_its_bytes_are_counted(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    origin = WebSocketOrigin(WS_ORIGIN)
    trail = tmp_path / "trail.jsonl"
    try:
        gateway = make_gateway(config(audit={"file": str(trail)}), {"shop.yaml": policy("ws.test", "other.test")})
        sock, ws = websocket_through_proxy(gateway.proxy_port, origin.port)
        with sock:
            assert exchange(sock, ws, "hello") == "echo hello"
            assert exchange(sock, ws, "x" * 5000) == "echo " + "x" * 5000
            gateway.write_policy("shop.yaml", policy("other.test"))
            assert closed_by_peer(sock, timeout=5), "the upgraded connection to a now-denied host stays open"
        record = gateway.wait_for(
            "egress_decision", lambda e: e.get("egress.reason") == "revoked" and e.get("server.address") == "ws.test"
        )
        assert "policy change" in record["egress.message"]
        deadline = time.monotonic() + 15
        spans: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            spans = [s for s in trail_spans(trail, "ws.test") if s.get("egress.reason") == "revoked"]
            if spans:
                break
            time.sleep(0.3)
        assert spans, "no revoked record of the upgraded connection in the audit trail"
        (span,) = spans
        assert span["egress.bytes_sent"] > 5000  # both client frames (masked, framed) after the 101
        assert span["egress.bytes_received"] > 5000  # both echoes
        assert span["http.response.status_code"] == 101
        assert origin.messages == ["hello", "x" * 5000]
    finally:
        origin.stop()


def test_an_upgraded_connection_lives_while_either_side_talks_and_closes_after_idle_s_of_silence(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    """The session's one idle timer covers plain HTTP and what it upgrades to: bytes in either direction re-arm it."""
    origin = WebSocketOrigin(WS_ORIGIN)
    try:
        gateway = make_gateway(config(timeouts={"idle_s": 2, "client_request_s": 30}), {"shop.yaml": policy("ws.test")})
        sock, ws = websocket_through_proxy(gateway.proxy_port, origin.port)
        with sock:
            for n in range(5):  # 5 s of traffic, never 2 s apart
                time.sleep(1.0)
                assert exchange(sock, ws, f"ping {n}") == f"echo ping {n}"
            started = time.monotonic()
            assert closed_by_peer(sock, timeout=10), "a silent upgraded connection stays open"
            silent = time.monotonic() - started
        assert 1.5 < silent < 6, silent
        gateway.wait_for("tunnel_idle_timeout")  # the session's timer, not mitmproxy's later backstop
    finally:
        origin.stop()
