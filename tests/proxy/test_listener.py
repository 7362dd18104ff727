"""The tunnel listener (egress_gateway/proxy/listener.py) through real sockets: what only it must get right.

CONNECT tunnels are served by the session, plain HTTP by mitmproxy; these tests cover the seams: a CONNECT split at
any byte, a CONNECT that follows a plain-HTTP request on a kept-alive connection (taken back from mitmproxy), TCP
half-close in both directions, flow control towards a destination that stops reading, and a tunnel into the
gateway itself.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxy.conftest import PAYMENTS_POD, STATIC_IDENTITIES, connect, raw_request
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer, RawTcpOrigin

pytestmark = pytest.mark.slow

PLAIN_ORIGIN = "127.0.0.12"
RAW_ORIGIN = "127.0.0.13"

POLICIES = {
    "shop.yaml": """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  rules:
    - name: origins
      hosts: [plain.test, raw.test, self.test]
      protocols: [TLS, HTTP, TCP]  # raw.test speaks an opaque protocol
    - name: no-denied
      action: Deny
      hosts: [denied.test]
""",
}


class HalfCloseOrigin(RawTcpOrigin):
    """Reads until the client's EOF, then answers how many bytes it got and closes."""

    threaded = True

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            received = 0
            while chunk := conn.recv(65536):
                received += len(chunk)
            conn.sendall(b"got %d\n" % received)


class GreetThenListenOrigin(RawTcpOrigin):
    """Sends a greeting and half-closes its side at once, then reads until EOF and reports what arrived after."""

    threaded = True

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.after_eof: list[bytes] = []

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            conn.sendall(b"hello\n")
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.after_eof.append(data)


class NeverReadsOrigin(RawTcpOrigin):
    """Accepts and holds connections without ever reading from them."""

    threaded = True

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.held: list[socket.socket] = []

    def handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.held.append(conn)


@dataclass
class Env:
    gateway: GatewayProcess
    plain: OriginServer
    hosts: dict[str, str]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("listener")
    plain = OriginServer(PLAIN_ORIGIN, None, "plain").start()
    hosts = {"plain.test": PLAIN_ORIGIN, "raw.test": RAW_ORIGIN, "self.test": "127.0.0.1"}
    config = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"hosts": {name: [ip] for name, ip in hosts.items()}},
    }
    gateway = GatewayProcess(Path(base / "gw"), config, POLICIES).start()
    try:
        yield Env(gateway, plain, hosts)
    finally:
        gateway.stop()
        plain.stop()


def _read_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_connect_split_at_every_byte_is_served(env: Env) -> None:
    request = f"CONNECT plain.test:{env.plain.port} HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode()
    with socket.create_connection(
        ("127.0.0.1", env.gateway.proxy_port), timeout=10, source_address=(PAYMENTS_POD, 0)
    ) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(request)):
            sock.sendall(request[index : index + 1])
            time.sleep(0.002)
        assert sock.recv(65536) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(b"GET /split HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n")
        assert _read_until_eof(sock).startswith(b"HTTP/1.1 200")


def test_http_10_connect_is_answered_in_http_10(env: Env) -> None:
    answer = raw_request(env.gateway.proxy_port, f"CONNECT plain.test:{env.plain.port} HTTP/1.0\r\n\r\n".encode())
    with answer.sock:
        assert answer.status == 200


def test_connect_after_plain_http_on_a_kept_alive_connection_is_decided_too(env: Env) -> None:
    """The first request makes the connection mitmproxy's; a CONNECT that follows is decided by the same addon."""
    first = raw_request(
        env.gateway.proxy_port,
        f"GET http://plain.test:{env.plain.port}/first HTTP/1.1\r\nHost: plain.test:{env.plain.port}\r\n\r\n".encode(),
    )
    with first.sock as sock:
        assert first.status == 200
        sock.sendall(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n")
        denied = sock.recv(65536)
        assert denied.startswith(b"HTTP/1.1 403"), denied
        assert b"denied_by_rule" in denied, denied
    second = raw_request(
        env.gateway.proxy_port,
        f"GET http://plain.test:{env.plain.port}/again HTTP/1.1\r\nHost: plain.test:{env.plain.port}\r\n\r\n".encode(),
    )
    with second.sock as sock:
        assert second.status == 200
        sock.sendall(f"CONNECT plain.test:{env.plain.port} HTTP/1.1\r\nHost: plain.test\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /tunnelled HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n")
        assert _read_until_eof(sock).startswith(b"HTTP/1.1 200")


def test_client_half_close_reaches_the_destination_and_the_answer_still_comes_back(env: Env) -> None:
    origin = HalfCloseOrigin(RAW_ORIGIN)
    try:
        answer = connect(env.gateway.proxy_port, f"raw.test:{origin.port}")
        with answer.sock as sock:
            assert answer.status == 200
            sock.sendall(b"x" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            assert _read_until_eof(sock) == b"got 100000\n"
    finally:
        origin.stop()


def test_destination_half_close_reaches_the_client_which_can_still_send(env: Env) -> None:
    origin = GreetThenListenOrigin(RAW_ORIGIN)
    try:
        answer = connect(env.gateway.proxy_port, f"raw.test:{origin.port}")
        with answer.sock as sock:
            assert answer.status == 200
            sock.sendall(b"first ")  # a non-TLS tunnel opens on its first bytes
            assert _read_until_eof(sock) == b"hello\n"  # the destination's EOF arrives as EOF
            sock.sendall(b"after eof")
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 10
            while not origin.after_eof and time.monotonic() < deadline:
                time.sleep(0.02)
        assert origin.after_eof == [b"first after eof"]
    finally:
        origin.stop()


def test_destination_that_never_reads_stalls_the_client_instead_of_filling_memory(env: Env) -> None:
    origin = NeverReadsOrigin(RAW_ORIGIN)
    try:
        answer = connect(env.gateway.proxy_port, f"raw.test:{origin.port}")
        with answer.sock as sock:
            assert answer.status == 200
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.settimeout(3)
            sent = 0
            chunk = b"y" * 65536
            try:
                while sent < 256 * 1024 * 1024:
                    sent += sock.send(chunk)
            except TimeoutError:
                pass
            # Kernel buffers on three sockets plus the transports' high-water marks: a few MiB, not the 256 MiB.
            assert sent < 64 * 1024 * 1024, sent
        status, _ = _get(env, f"http://plain.test:{env.plain.port}/still-serving")
        assert status == 200
    finally:
        for held in origin.held:
            held.close()
        origin.stop()


def test_tunnel_into_the_gateway_itself_is_refused(env: Env) -> None:
    answer = connect(env.gateway.proxy_port, f"self.test:{env.gateway.proxy_port}")
    with answer.sock:
        # Decided at CONNECT: the pinned address is the gateway's own port (issue 12, class 4).
        assert answer.status == 403
        assert answer.body.startswith(b"self_connect: ")
    record = env.gateway.wait_for(
        "egress_decision",
        lambda e: e.get("server.address") == "self.test" and e.get("egress.reason") == "self_connect",
    )
    assert "itself" in record["egress.message"]


def test_many_concurrent_tunnels_are_all_served(env: Env) -> None:
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            answer = connect(env.gateway.proxy_port, f"plain.test:{env.plain.port}")
            with answer.sock as sock:
                assert answer.status == 200
                sock.sendall(f"GET /c{index} HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n".encode())
                assert _read_until_eof(sock).startswith(b"HTTP/1.1 200")
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:3]


def _get(env: Env, url: str) -> tuple[int, bytes]:
    host_port = url.split("/")[2]
    answer = raw_request(env.gateway.proxy_port, f"GET {url} HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode())
    answer.sock.close()
    return answer.status, answer.body


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("127.0.0.1", 3128), True),
        (("127.0.0.2", 3128), True),  # any loopback address reaches a listener bound to a wildcard or 127.0.0.1
        (("::1", 3128), True),
        (("0.0.0.0", 3128), True),
        (("localhost", 3128), False),  # a name: never dialed (the gate pins an address)
        (("10.0.0.5", 3128), True),  # the bound address itself
        (("10.0.0.6", 3128), False),
        (("127.0.0.1", 3129), False),
        (("example.test", 3128), False),
    ],
)
def test_dials_itself_is_the_one_rule_for_both_paths(address: tuple[str, int], expected: bool) -> None:
    """The session's dial and mitmproxy's `server_connect` both ask the gate's `OwnAddresses.dials_itself`."""
    from ipaddress import ip_address

    from egress_gateway.proxy.own import OwnAddresses

    own = OwnAddresses([ip_address("10.0.0.5")], ports=[3128], enumerate_interfaces=frozenset)
    assert (own.dials_itself(*address) is not None) is expected
