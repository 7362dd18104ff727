"""Fault injection against the running gateway: a DNS server that times out, fails, lies or talks garbage; an
upstream that resets mid-stream; an OTLP collector that is down. Affected connections get the right error and a
decision record; unaffected traffic keeps flowing and the process neither crashes nor leaks descriptors.

The API-server faults (hangs, 500s, dropped watch streams) are covered with the Kubernetes source in tests/kube.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.hardening.conftest import (
    PLAIN_ORIGIN,
    POLICIES,
    TLS_ORIGIN,
    gateway_config,
    hostile_source,
    open_fds,
)
from tests.proxy.conftest import PAYMENTS_POD, closed_by_peer, connect, curl, raw_request
from tests.support.dns_server import GARBAGE, SERVFAIL, SILENT, FaultyDNS
from tests.support.gateway import GatewayProcess
from tests.support.netns import require_isolated_network
from tests.support.origins import OriginServer, RawTcpOrigin
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

FAULTY_POLICY = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: faulty, namespace: hostile}
spec:
  rules:
    - name: everything-here
      hosts: ["*.fault.test", allowed.test, plain.test, reset.test]
"""


@dataclass
class FaultEnv:
    gateway: GatewayProcess
    dns: FaultyDNS
    tls: OriginServer
    ca: TestCA

    def still_serves(self) -> None:
        result = curl(self.gateway, f"https://allowed.test:{self.tls.port}/ok", ca=self.ca, source=PAYMENTS_POD)
        assert result.exit_code == 0 and result.status == 200, result.stderr


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultEnv]:
    base = tmp_path_factory.mktemp("faults")
    ca = TestCA(base / "ca")
    tls = OriginServer(TLS_ORIGIN, ca.issue("allowed.test").server_context(), "tls").start()
    dns = FaultyDNS(
        {
            "timeout.fault.test": SILENT,
            "servfail.fault.test": SERVFAIL,
            "garbage.fault.test": GARBAGE,
            "private.fault.test": ["10.0.0.5"],
            "metadata.fault.test": ["169.254.169.254"],
            "mixed.fault.test": ["10.0.0.5", PLAIN_ORIGIN],
        }
    ).start()
    config = gateway_config(
        resolver={
            "nameservers": [dns.address],
            "timeout_s": 1,
            # Names the gateway must keep serving while DNS misbehaves come from resolver.hosts.
            "hosts": {"allowed.test": [TLS_ORIGIN], "plain.test": [PLAIN_ORIGIN], "reset.test": [PLAIN_ORIGIN]},
        },
        allowed_ranges=["127.0.0.0/8"],
    )
    gateway = GatewayProcess(Path(base / "gw"), config, {"shop.yaml": POLICIES["shop.yaml"], "f.yaml": FAULTY_POLICY})
    gateway.start()
    try:
        yield FaultEnv(gateway, dns, tls, ca)
    finally:
        gateway.stop()
        dns.stop()
        tls.stop()


def _decision(env: FaultEnv, source: str, reason: str) -> None:
    env.gateway.wait_for(
        "egress_decision", lambda e: e.get("client.address") == source and e.get("egress.reason") == reason
    )


# ---- DNS ------------------------------------------------------------------------------------------------------------


def test_dns_timeout_is_502_dns_timeout_while_other_traffic_flows(faulty: FaultEnv) -> None:
    source = hostile_source()
    results: dict[str, object] = {}

    def stuck() -> None:
        started = time.monotonic()
        answer = connect(faulty.gateway.proxy_port, "timeout.fault.test:443", source)
        results["status"], results["body"] = answer.status, answer.body
        results["headers"], results["took"] = answer.headers, time.monotonic() - started

    thread = threading.Thread(target=stuck)
    thread.start()
    time.sleep(0.2)
    faulty.still_serves()  # while the lookup hangs, the event loop serves others
    thread.join(timeout=15)
    assert results["status"] == 502
    assert str(results["body"]).startswith("b'dns_timeout: no DNS answer for timeout.fault.test within 1 s")
    assert results["headers"]["proxy-status"].startswith("egress-gateway; error=dns_timeout")  # type: ignore[index]
    assert float(results["took"]) < 1 + 3  # type: ignore[arg-type]
    _decision(faulty, source, "dns_timeout")


@pytest.mark.parametrize(
    ("name", "reason"),
    [("servfail.fault.test", "dns_error"), ("nxdomain.fault.test", "dns_error"), ("garbage.fault.test", None)],
)
def test_dns_failures_are_502_with_their_reason(faulty: FaultEnv, name: str, reason: str | None) -> None:
    source = hostile_source()
    answer = connect(faulty.gateway.proxy_port, f"{name}:443", source)
    assert answer.status == 502
    # Garbage answers are dropped by dnspython as unparseable, so that lookup ends as a timeout.
    expected = reason or "dns_timeout"
    assert answer.body.startswith(f"{expected}: ".encode()), answer.body
    _decision(faulty, source, expected)
    faulty.still_serves()


@pytest.mark.netns
@pytest.mark.parametrize(
    ("name", "reason"), [("private.fault.test", "private_address"), ("metadata.fault.test", "blocked_address")]
)
def test_dns_answers_pointing_inside_are_403(faulty: FaultEnv, name: str, reason: str) -> None:
    require_isolated_network()
    source = hostile_source()
    answer = connect(faulty.gateway.proxy_port, f"{name}:443", source)
    assert answer.status == 403
    assert answer.body.startswith(f"{reason}: ".encode())
    assert "error=destination_ip_prohibited" in answer.headers["proxy-status"]
    _decision(faulty, source, reason)
    faulty.still_serves()


# ---- upstream resets ------------------------------------------------------------------------------------------------


class ResettingOrigin(RawTcpOrigin):
    """Reads a request, sends a response head and half its body, then resets (SO_LINGER 0)."""

    def __init__(self, host: str) -> None:
        self.resets = 0
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 50_000)
            time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            self.resets += 1


def _read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_upstream_reset_mid_stream_ends_that_request_only_and_leaks_nothing(faulty: FaultEnv) -> None:
    origin = ResettingOrigin(PLAIN_ORIGIN)
    assert faulty.gateway.process is not None
    pid = faulty.gateway.process.pid
    try:
        source = hostile_source()
        faulty.still_serves()
        fds_before = open_fds(pid)
        for index in range(10):
            if index % 2:
                request = f"GET http://reset.test:{origin.port}/ HTTP/1.1\r\nHost: reset.test:{origin.port}\r\n\r\n"
                sock = socket.create_connection(
                    ("127.0.0.1", faulty.gateway.proxy_port), timeout=10, source_address=(source, 0)
                )
                sock.sendall(request.encode())
            else:
                answer = connect(faulty.gateway.proxy_port, f"reset.test:{origin.port}", source)
                assert answer.status == 200
                sock = answer.sock
                sock.sendall(b"GET / HTTP/1.1\r\nHost: reset.test\r\n\r\n")
            data = _read_until_closed(sock)
            sock.close()
            assert data.startswith(b"HTTP/1.1 200") and len(data) < 100_000  # truncated, then closed
        assert origin.resets == 10
        faulty.still_serves()
        deadline = time.monotonic() + 10
        while open_fds(pid) > fds_before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_fds(pid) <= fds_before + 2
    finally:
        origin.stop()


def test_tunnel_to_a_port_nobody_listens_on_is_closed_with_connection_refused(faulty: FaultEnv) -> None:
    source = hostile_source()
    unused = socket.socket()
    unused.bind((PLAIN_ORIGIN, 0))
    port = unused.getsockname()[1]
    unused.close()
    answer = connect(faulty.gateway.proxy_port, f"reset.test:{port}", source)
    assert answer.status == 200  # decided before any connect: the tunnel is granted, then the dial fails
    answer.sock.sendall(b"GET / HTTP/1.1\r\nHost: reset.test\r\n\r\n")
    assert closed_by_peer(answer.sock)
    _decision(faulty, source, "connection_refused")
    faulty.still_serves()


# ---- OTLP collector down --------------------------------------------------------------------------------------------


def test_otlp_endpoint_down_does_not_slow_or_stop_the_data_path(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer], ca: TestCA
) -> None:
    origin = make_origin(TLS_ORIGIN, ca.issue("allowed.test").server_context())
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    gateway = make_gateway(
        gateway_config(audit={"otlp_endpoint": f"http://127.0.0.1:{dead_port}", "otlp_protocol": "http"}),
        POLICIES,
    )
    took = []
    for index in range(20):
        started = time.monotonic()
        result = curl(gateway, f"https://allowed.test:{origin.port}/otlp-down-{index}", ca=ca)
        took.append(time.monotonic() - started)
        assert result.status == 200, result.stderr
    denied = raw_request(gateway.proxy_port, b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n", hostile_source())
    assert denied.status == 403
    assert max(took) < 3, took
    time.sleep(2)  # let the batch processor try (and fail) to export
    assert gateway.process is not None and gateway.process.poll() is None
    assert curl(gateway, f"https://allowed.test:{origin.port}/after", ca=ca).status == 200
    assert len(gateway.find("egress_decision")) >= 21  # the log line is still written for every decision
