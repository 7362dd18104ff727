"""Issue 12 item 11: one client's bad bytes never cost other clients their audit records.

A real gateway writes the trail while one client sends a Host header with bytes that are not UTF-8 (0xff, 0xfe),
another a TLS ClientHello whose SNI carries 0xff, and 8 others make ordinary HTTPS requests at the same time. Every
record reaches the trail, and the odd ones are readable by the `audit` command, the Host's bytes escaped (`\\xff`),
not lost or mangled.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.audit.conftest import span_lines
from tests.proxy.conftest import PAYMENTS_POD, curl
from tests.support.gateway import REPO, GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

ORIGIN_IP = "127.0.0.5"
HOST = "api.stripe.test"
NORMAL_CLIENTS = 8
BAD_HOST = b"caf\xff\xfe.test"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def origin(ca: TestCA) -> Iterator[OriginServer]:
    server = OriginServer(ORIGIN_IP, ca.issue(HOST).server_context(), "origin").start()
    yield server
    server.stop()


def _bad_host_request(gateway: GatewayProcess, port: int) -> bytes:
    """A plain-HTTP proxy request whose Host header carries bytes that are not UTF-8."""
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=15, source_address=(PAYMENTS_POD, 0)) as s:
        s.sendall(b"GET http://" + HOST.encode() + b":%d/ HTTP/1.1\r\nHost: " % port + BAD_HOST + b"\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def _bad_sni_tunnel(gateway: GatewayProcess, port: int) -> bytes:
    """A CONNECT tunnel whose ClientHello (from OpenSSL) names a server with byte 0xff in it."""
    context = ssl.create_default_context()
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="api.strxpe.test")
    with contextlib.suppress(ssl.SSLWantReadError):  # the ClientHello is written; no server answers here
        tls.do_handshake()
    hello = outgoing.read().replace(b"api.strxpe.test", b"api.str\xffpe.test")
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=15, source_address=(PAYMENTS_POD, 0)) as s:
        s.sendall(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        answer = s.recv(65536)
        s.sendall(hello)
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egress_gateway", "audit", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_host_or_sni_with_bytes_that_are_not_utf8_loses_no_record(
    tmp_path: Path, ca: TestCA, origin: OriginServer
) -> None:
    trail = tmp_path / "audit.jsonl"
    config: dict[str, Any] = {
        "default_action": "Allow",
        "identity": {"mode": ["static"], "static": [{"cidr": f"{PAYMENTS_POD}/32", "namespace": "shop"}]},
        "resolver": {"hosts": {HOST: [ORIGIN_IP]}},
        "allowed_ranges": ["127.0.0.0/8"],
        "audit": {"file": str(trail)},
    }
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    results: list[Any] = []
    try:
        threads = [
            threading.Thread(target=lambda: results.append(curl(gateway, f"https://{HOST}:{origin.port}/", ca=ca)))
            for _ in range(NORMAL_CLIENTS)
        ]
        for thread in threads[: NORMAL_CLIENTS // 2]:
            thread.start()
        answer = _bad_host_request(gateway, origin.port)  # among the others: their records share its batch
        tunnel = _bad_sni_tunnel(gateway, origin.port)
        for thread in threads[NORMAL_CLIENTS // 2 :]:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        assert gateway.stop() == 0
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert tunnel.startswith(b"HTTP/1.1 200"), tunnel[:200]  # then closed: the SNI is refused
    assert [r.status for r in results] == [200] * NORMAL_CLIENTS

    raw = trail.read_bytes()
    raw.decode("utf-8")  # the whole trail is valid UTF-8
    lines = [json.loads(line) for line in span_lines(raw.decode())]
    assert len(lines) == NORMAL_CLIENTS + 2

    done = _audit(str(trail), "--output", "json")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == NORMAL_CLIENTS + 2
    (odd,) = [r for r in records if r.get("http.request.method") == "GET"]
    assert odd["egress.host_header"] == "caf\\xff\\xfe.test"  # the bytes, escaped
    assert odd["egress.decision"] == "deny"
    denied_tunnels = [
        r for r in records if r.get("http.request.method") == "CONNECT" and r["egress.decision"] == "deny"
    ]
    assert len(denied_tunnels) == 1 and "not ASCII" in denied_tunnels[0]["egress.message"]
    table = _audit(str(trail))
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == NORMAL_CLIENTS + 3  # header + one row per record
