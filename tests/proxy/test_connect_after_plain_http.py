"""A CONNECT that follows plain HTTP on one kept-alive connection (issue 13, "one connection, one owner").

mitmproxy serves the plain-HTTP requests; at the CONNECT the session takes the connection back: the responses to
the earlier requests are completed and delivered first, in order, then the CONNECT is checked, decided, recorded
and relayed exactly like a CONNECT that opened the connection. Real sockets on loopback throughout.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxy.conftest import PAYMENTS_POD, STATIC_IDENTITIES, closed_by_peer
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer, RawTcpOrigin

pytestmark = pytest.mark.slow

PLAIN_ORIGIN = "127.0.0.12"
STREAM_ORIGIN = "127.0.0.14"


def policy(*hosts: str) -> str:
    return f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: payments, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: payments}}}}
  rules:
    - name: origins
      hosts: [{", ".join(hosts)}]
      protocols: [HTTP]
    - name: no-denied
      action: Deny
      hosts: [denied.test]
"""


class StreamingOrigin(RawTcpOrigin):
    """Answers a request with a chunked body: the first chunk at once, the rest when `release` is set."""

    threaded = True

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.release = threading.Event()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                head += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            self.release.wait(10)
            conn.sendall(b"4\r\nlast\r\n0\r\n\r\n")
            while conn.recv(65536):  # keep-alive until the gateway closes its side
                pass


@dataclass
class Env:
    gateway: GatewayProcess
    plain: OriginServer
    stream: StreamingOrigin


def start_gateway(workdir: Path) -> tuple[GatewayProcess, OriginServer, StreamingOrigin]:
    plain = OriginServer(PLAIN_ORIGIN, None, "plain").start()
    stream = StreamingOrigin(STREAM_ORIGIN)
    config = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"hosts": {"plain.test": [PLAIN_ORIGIN], "stream.test": [STREAM_ORIGIN]}},
    }
    gateway = GatewayProcess(workdir, config, {"shop.yaml": policy("plain.test", "stream.test")}).start()
    return gateway, plain, stream


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    gateway, plain, stream = start_gateway(tmp_path_factory.mktemp("connect-after") / "gw")
    try:
        yield Env(gateway, plain, stream)
    finally:
        gateway.stop()
        plain.stop()
        stream.stop()


def client(env: Env | GatewayProcess) -> socket.socket:
    gateway = env.gateway if isinstance(env, Env) else env
    sock = socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=10, source_address=(PAYMENTS_POD, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def get(authority: str, path: str) -> bytes:
    return f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


def connect_head(authority: str) -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


class Reader:
    """What the gateway sends on one connection, read message by message (pipelined answers arrive together)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def until(self, done: Callable[[bytes], bool]) -> None:
        while not done(self.data):
            chunk = self.sock.recv(65536)
            assert chunk, self.data
            self.data += chunk

    def take(self, size: int) -> bytes:
        self.until(lambda d: len(d) >= size)
        taken, self.data = self.data[:size], self.data[size:]
        return taken

    def head(self) -> bytes:
        self.until(lambda d: b"\r\n\r\n" in d)
        return self.take(self.data.index(b"\r\n\r\n") + 4)

    def response(self) -> bytes:
        """One response with a Content-Length body."""
        head = self.head()
        lines = head.lower().split(b"\r\n")
        return head + self.take(next(int(line[15:]) for line in lines if line.startswith(b"content-length:")))

    def get(self, path: str) -> bytes:
        """A request through the tunnel, and its response."""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode())
        return self.response()


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


# ---- allowed and denied ---------------------------------------------------------------------------------------------


def test_get_then_an_allowed_connect_is_decided_and_relayed_by_the_session(env: Env) -> None:
    authority = f"plain.test:{env.plain.port}"
    with client(env) as sock:
        read = Reader(sock)
        sock.sendall(get(authority, "/first"))
        assert b'"/first"' in read.response()
        sock.sendall(connect_head(authority))
        assert read.head() == ESTABLISHED
        answer = read.get("/in-the-tunnel")
        assert answer.startswith(b"HTTP/1.1 200") and b'"/in-the-tunnel"' in answer
        assert b'"/again"' in read.get("/again")  # a kept-alive tunnel: its requests are checked too
    env.gateway.wait_for(
        "egress_decision",
        lambda e: (
            e.get("server.address") == "plain.test"
            and e.get("egress.decision") == "allow"
            and e.get("http.request.method") == "CONNECT"
        ),
    )


def test_get_then_a_denied_connect_gets_403_and_the_connection_closes(env: Env) -> None:
    before = len(env.plain.requests)
    with client(env) as sock:
        read = Reader(sock)
        sock.sendall(get(f"plain.test:{env.plain.port}", "/first"))
        assert b'"/first"' in read.response()
        sock.sendall(connect_head("denied.test:443") + b"\x16\x03\x01 anything that follows is never relayed")
        answer = read.response()
        assert answer.startswith(b"HTTP/1.1 403") and b"denied_by_rule" in answer, answer
        assert closed_by_peer(sock)
    assert len(env.plain.requests) == before + 1
    env.gateway.wait_for(
        "egress_decision",
        lambda e: e.get("server.address") == "denied.test" and e.get("egress.reason") == "denied_by_rule",
    )


def test_pipelined_get_and_connect_in_one_write_are_answered_in_order(env: Env) -> None:
    authority = f"plain.test:{env.plain.port}"
    with client(env) as sock:
        read = Reader(sock)
        sock.sendall(get(authority, "/one") + get(authority, "/two") + connect_head(authority))
        assert b'"/one"' in read.response()
        assert b'"/two"' in read.response()
        assert read.head() == ESTABLISHED
        assert b'"/tunnelled"' in read.get("/tunnelled")


def test_tunnel_bytes_in_the_same_write_as_the_get_and_the_connect_reach_the_tunnel(env: Env) -> None:
    authority = f"plain.test:{env.plain.port}"
    with client(env) as sock:
        read = Reader(sock)
        inner = b"GET /early HTTP/1.1\r\nHost: plain.test\r\n\r\n"
        sock.sendall(get(authority, "/first") + connect_head(authority) + inner)
        assert b'"/first"' in read.response()
        assert read.head() == ESTABLISHED
        assert b'"/early"' in read.response()


def test_a_malformed_connect_head_after_a_get_gets_the_head_checks_answer(env: Env) -> None:
    with client(env) as sock:
        read = Reader(sock)
        sock.sendall(get(f"plain.test:{env.plain.port}", "/first"))
        assert b'"/first"' in read.response()
        sock.sendall(
            b"CONNECT plain.test:80 HTTP/1.1\r\nHost: plain.test\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        answer = read.response()
        assert answer.startswith(b"HTTP/1.1 400") and b"bad_request" in answer, answer
        assert closed_by_peer(sock)


# ---- the CONNECT waits for the responses before it -----------------------------------------------------------------


def test_connect_after_a_get_whose_body_is_still_streaming_waits_for_its_end(env: Env) -> None:
    env.stream.release.clear()
    with client(env) as sock:
        read = Reader(sock)
        sock.sendall(get(f"stream.test:{env.stream.port}", "/slow"))
        assert read.head().startswith(b"HTTP/1.1 200")
        assert read.take(len(b"5\r\nfirst\r\n")) == b"5\r\nfirst\r\n"
        sock.sendall(connect_head(f"plain.test:{env.plain.port}"))
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            early = sock.recv(65536)
            pytest.fail(f"answered before the streaming response ended: {early!r}")
        sock.settimeout(10)
        env.stream.release.set()
        assert read.take(len(b"4\r\nlast\r\n0\r\n\r\n")) == b"4\r\nlast\r\n0\r\n\r\n"
        assert read.head() == ESTABLISHED
        assert b'"/after-stream"' in read.get("/after-stream")


# ---- revocation ----------------------------------------------------------------------------------------------------


def test_a_tunnel_opened_after_plain_http_is_revoked_by_a_policy_change(tmp_path: Path) -> None:
    gateway, plain, stream = start_gateway(tmp_path / "gw")
    try:
        authority = f"plain.test:{plain.port}"
        with client(gateway) as sock:
            read = Reader(sock)
            sock.sendall(get(authority, "/first"))
            assert b'"/first"' in read.response()
            sock.sendall(connect_head(authority))
            assert read.head() == ESTABLISHED
            assert b'"/before"' in read.get("/before")
            gateway.write_policy("shop.yaml", policy("stream.test"))
            started = time.monotonic()
            assert closed_by_peer(sock, timeout=5), "the tunnel to a now-denied host stays open"
            assert time.monotonic() - started < 3
        record = gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "revoked")
        assert record["server.address"] == "plain.test"
    finally:
        gateway.stop()
        plain.stop()
        stream.stop()
