"""Fixtures for gateway tests: a test CA, origins on distinct loopback addresses, the gateway as a subprocess,
and clients bound to a source address (127.0.0.2 = a payments pod in `shop`, 127.0.0.3 = a pod in `analytics`)."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

PAYMENTS_POD = "127.0.0.2"
ANALYTICS_POD = "127.0.0.3"
UNKNOWN_POD = "127.0.0.9"

STATIC_IDENTITIES = [
    {"cidr": f"{PAYMENTS_POD}/32", "namespace": "shop", "pod": "payments-1", "labels": {"app": "payments"}},
    {"cidr": f"{ANALYTICS_POD}/32", "namespace": "analytics", "pod": "reports-1", "labels": {"app": "reports"}},
]


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def make_origin() -> Iterator[Callable[..., OriginServer]]:
    started: list[OriginServer] = []

    def make(host: str, tls: ssl.SSLContext | None = None, name: str = "origin") -> OriginServer:
        server = OriginServer(host, tls, name).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(config: dict[str, Any], policies: dict[str, str] | None = None, **start: Any) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path / f"gateway{len(started)}", config, policies)
        started.append(gateway)
        return gateway.start(**start)

    yield make
    for gateway in started:
        gateway.stop()


# ---- clients --------------------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    exit_code: int
    body: str
    status: int  # the origin's status (0 when there was none)
    connect_status: int  # the proxy's answer to CONNECT (0 for plain HTTP)
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


def curl(
    gateway: GatewayProcess, url: str, *args: str, source: str = PAYMENTS_POD, ca: TestCA | None = None
) -> CurlResult:
    command = ["curl", "-sS", "--max-time", "15", "--interface", source, "-x", gateway.proxy_url]
    if ca is not None:
        command += ["--cacert", str(ca.cert_path)]
    command += ["-w", "\n%{http_code} %{http_connect}", *args, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    body, _, codes = done.stdout.rpartition("\n")
    status, _, connect = codes.partition(" ")
    return CurlResult(done.returncode, body, int(status or 0), int(connect or 0), done.stderr)


class SourceAddressAdapter(HTTPAdapter):
    """requests adapter whose connections (to the proxy too) leave from a given source address (= a "pod")."""

    def __init__(self, source: str, **kwargs: Any) -> None:
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        kwargs["source_address"] = (self.source, 0)
        return super().proxy_manager_for(proxy, **kwargs)


def requests_session(gateway: GatewayProcess, source: str = PAYMENTS_POD, ca: TestCA | None = None) -> requests.Session:
    """A requests session that uses the gateway as HTTP_PROXY/HTTPS_PROXY from `source`."""
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": gateway.proxy_url, "https": gateway.proxy_url}
    adapter = SourceAddressAdapter(source)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if ca is not None:
        session.verify = str(ca.cert_path)
    return session


@dataclass
class ProxyAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    sock: socket.socket


def raw_request(proxy_port: int, request: bytes, source: str = PAYMENTS_POD, timeout: float = 10.0) -> ProxyAnswer:
    """Send raw bytes to the proxy and read one response head (and its Content-Length body)."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout, source_address=(source, 0))
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return ProxyAnswer(status, headers, rest[:length], sock)


def connect(proxy_port: int, authority: str, source: str = PAYMENTS_POD, extra: str = "") -> ProxyAnswer:
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()
    return raw_request(proxy_port, request, source)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the peer closes the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def tls_through(answer: ProxyAnswer, ca: TestCA, server_hostname: str) -> ssl.SSLSocket:
    """Run a real TLS handshake through an established tunnel."""
    return ca.client_context().wrap_socket(answer.sock, server_hostname=server_hostname)


def pipelined_tls_handshake(
    proxy_port: int, authority: str, ca: TestCA, server_hostname: str, source: str = PAYMENTS_POD
) -> tuple[int, bool]:
    """Send the CONNECT and the ClientHello in one write (before the proxy answered), then finish the handshake.

    Returns (CONNECT status, whether the TLS handshake completed)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ca.client_context().wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10, source_address=(source, 0))
    with sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + outgoing.read())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, False
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        incoming.write(rest)
        for _ in range(50):
            try:
                tls.do_handshake()
                return status, True
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return status, False
                if not chunk:
                    return status, False
                incoming.write(chunk)
            except (ssl.SSLError, OSError):
                return status, False
        return status, False
