"""The gateway end to end: real clients (curl, httpx, raw sockets) through `egress-gateway run` to TLS and HTTP
origins on loopback, each client bound to the source address that identifies its "pod"."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.proxy.conftest import (
    ANALYTICS_POD,
    STATIC_IDENTITIES,
    UNKNOWN_POD,
    closed_by_peer,
    connect,
    curl,
    pipelined_tls_handshake,
    raw_request,
    requests_session,
    tls_through,
)
from tests.support.gateway import GatewayProcess
from tests.support.netns import require_isolated_network
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

TLS_ORIGIN = "127.0.0.10"
CIDR_ORIGIN = "127.0.0.11"
PLAIN_ORIGIN = "127.0.0.12"

POLICIES = {
    "shop.yaml": """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  rules:
    - name: origins
      hosts: [allowed.test, plain.test, "*.wild.test", metadata.test, private.test]
    - name: cidr-origin
      cidrs: [127.0.0.11/32]
    - name: https-only
      hosts: [port443.test]
      ports: [443]
    - name: no-denied
      action: Deny
      hosts: [denied.test]
""",
    "analytics.yaml": """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: analytics-current, namespace: analytics}
spec:
  rules:
    - name: everything-today
      hosts: [allowed.test]
---
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: analytics-onboarding, namespace: analytics}
spec:
  mode: Audit
  rules:
    - name: reports-only
      hosts: [reports.test]
    - name: not-allowed-test-any-more
      action: Deny
      hosts: [allowed.test]
""",
}

HOSTS = {
    "allowed.test": [TLS_ORIGIN],
    "denied.test": [TLS_ORIGIN],
    "x.wild.test": [TLS_ORIGIN],
    "port443.test": [TLS_ORIGIN],
    "plain.test": [PLAIN_ORIGIN],
    "metadata.test": ["169.254.169.254"],
    "private.test": ["10.1.2.3"],
}


@dataclass
class Env:
    gateway: GatewayProcess
    tls: OriginServer
    cidr: OriginServer
    plain: OriginServer
    ca: TestCA


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("gateway-e2e")
    ca = TestCA(base / "ca")
    tls_leaf = ca.issue("allowed.test", "denied.test", "*.wild.test", "port443.test", TLS_ORIGIN)
    cidr_leaf = ca.issue(CIDR_ORIGIN, "cidr.test")
    tls = OriginServer(TLS_ORIGIN, tls_leaf.server_context(), "tls").start()
    cidr = OriginServer(CIDR_ORIGIN, cidr_leaf.server_context(), "cidr").start()
    plain = OriginServer(PLAIN_ORIGIN, None, "plain").start()
    config = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"hosts": HOSTS},
    }
    gateway = GatewayProcess(Path(base / "gw"), config, POLICIES).start()
    try:
        yield Env(gateway, tls, cidr, plain, ca)
    finally:
        gateway.stop()
        for origin in (tls, cidr, plain):
            origin.stop()


def accepted_delta(origin: OriginServer, before: int, settle: float = 0.3) -> int:
    time.sleep(settle)
    return origin.accepted - before


# ---- allowed -----------------------------------------------------------------------------------------------------


def test_allowed_host_body_received_with_curl(env: Env) -> None:
    result = curl(env.gateway, f"https://allowed.test:{env.tls.port}/hello", ca=env.ca)
    assert result.exit_code == 0, result.stderr
    assert result.connect_status == 200 and result.status == 200
    seen = result.json()
    assert seen["path"] == "/hello" and seen["sni"] == "allowed.test" and seen["origin"] == "tls"


def test_allowed_host_with_requests_and_wildcard(env: Env) -> None:
    with requests_session(env.gateway, ca=env.ca) as session:
        response = session.get(f"https://x.wild.test:{env.tls.port}/wild", timeout=15)
        assert response.status_code == 200
        assert response.json()["sni"] == "x.wild.test"
        denied = session.get(f"http://denied.test:{env.tls.port}/", timeout=15)
        assert denied.status_code == 403
        assert denied.text.startswith("denied_by_rule: ")


def test_tls_is_passed_through_not_intercepted(env: Env) -> None:
    answer = connect(env.gateway.proxy_port, f"allowed.test:{env.tls.port}")
    assert answer.status == 200
    with tls_through(answer, env.ca, "allowed.test") as tls:
        # The certificate the client sees is the origin's own, issued by the test CA: no interception.
        cert = tls.getpeercert()
        assert cert is not None and ("DNS", "allowed.test") in cert["subjectAltName"]


# ---- denied at CONNECT -------------------------------------------------------------------------------------------


def test_denied_host_gets_403_with_reason_and_proxy_status(env: Env) -> None:
    before = env.tls.accepted
    answer = connect(env.gateway.proxy_port, f"denied.test:{env.tls.port}")
    assert answer.status == 403
    assert answer.body.decode().startswith("denied_by_rule: ")
    assert answer.body.count(b"\n") == 1
    assert answer.headers["proxy-status"].startswith("egress-gateway; error=http_request_denied; details=")
    assert "no-denied" in answer.headers["proxy-status"]
    result = curl(env.gateway, f"https://denied.test:{env.tls.port}/", ca=env.ca)
    assert result.connect_status == 403 and result.exit_code != 0
    assert accepted_delta(env.tls, before) == 0


def test_unknown_client_is_denied(env: Env) -> None:
    answer = connect(env.gateway.proxy_port, f"allowed.test:{env.tls.port}", source=UNKNOWN_POD)
    assert answer.status == 403
    assert answer.body.startswith(b"unknown_client: ")


def test_port_outside_the_rule_is_denied(env: Env) -> None:
    answer = connect(env.gateway.proxy_port, f"port443.test:{env.tls.port}")
    assert answer.status == 403
    assert answer.body.startswith(b"no_matching_rule: ")


def test_ip_literal_denied_unless_a_cidr_allows_it(env: Env) -> None:
    before = env.tls.accepted
    by_ip = connect(env.gateway.proxy_port, f"{TLS_ORIGIN}:{env.tls.port}")
    assert by_ip.status == 403, "allowed.test resolves to this IP, but the rule names hosts, not the address"
    assert by_ip.body.startswith(b"no_matching_rule: ")
    assert accepted_delta(env.tls, before) == 0
    allowed = connect(env.gateway.proxy_port, f"{CIDR_ORIGIN}:{env.cidr.port}")
    assert allowed.status == 200
    with tls_through(allowed, env.ca, CIDR_ORIGIN) as tls:
        tls.sendall(b"GET /by-ip HTTP/1.1\r\nHost: 127.0.0.11\r\nConnection: close\r\n\r\n")
        assert b'"/by-ip"' in tls.recv(65536) + tls.recv(65536)


@pytest.mark.parametrize(
    "spelling",
    ["2130706443", "0x7f00000b", "127.11", "0177.0.0.11", "[::ffff:127.0.0.11]", "[::ffff:7f00:b]"],
)
def test_ipv4_spellings_are_checked_like_the_plain_address(env: Env, spelling: str) -> None:
    answer = connect(env.gateway.proxy_port, f"{spelling}:{env.cidr.port}")
    assert answer.status == 200, answer.body
    with tls_through(answer, env.ca, CIDR_ORIGIN) as tls:
        tls.sendall(b"GET /spelled HTTP/1.1\r\nHost: 127.0.0.11\r\nConnection: close\r\n\r\n")
        data = tls.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("spelling", ["2130706442", "0x7f00000a", "127.10", "[::ffff:127.0.0.10]"])
def test_ipv4_spellings_of_an_address_without_cidr_rule_are_denied(env: Env, spelling: str) -> None:
    answer = connect(env.gateway.proxy_port, f"{spelling}:{env.tls.port}")
    assert answer.status == 403
    assert answer.body.startswith(b"no_matching_rule: ")


def test_uppercase_and_trailing_dot_names(env: Env) -> None:
    for authority in (f"ALLOWED.TEST:{env.tls.port}", f"allowed.test.:{env.tls.port}", f"Allowed.Test.:{env.tls.port}"):
        answer = connect(env.gateway.proxy_port, authority)
        assert answer.status == 200, authority
        with tls_through(answer, env.ca, "allowed.test") as tls:
            tls.sendall(b"GET /case HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
            assert tls.recv(65536).startswith(b"HTTP/1.1 200")
    for authority in (f"DENIED.TEST:{env.tls.port}", f"denied.test.:{env.tls.port}"):
        assert connect(env.gateway.proxy_port, authority).status == 403


# ---- SNI checks after CONNECT --------------------------------------------------------------------------------------


def test_sni_differing_from_connect_host_closes_before_reaching_the_origin(env: Env) -> None:
    before = env.tls.accepted
    answer = connect(env.gateway.proxy_port, f"allowed.test:{env.tls.port}")
    assert answer.status == 200
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_through(answer, env.ca, "x.wild.test")  # allowed too, but not what was CONNECTed: domain fronting
    assert accepted_delta(env.tls, before) == 0
    env.gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "sni_mismatch")


def test_host_deny_dodged_with_ip_literal_plus_sni_is_denied(env: Env) -> None:
    before = env.cidr.accepted
    answer = connect(env.gateway.proxy_port, f"{CIDR_ORIGIN}:{env.cidr.port}")
    assert answer.status == 200  # the CIDR rule allows the address itself...
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_through(answer, env.ca, "denied.test")  # ...but the SNI names a denied host
    assert accepted_delta(env.cidr, before) == 0
    env.gateway.wait_for(
        "egress_decision",
        lambda e: e.get("egress.reason") == "denied_by_rule" and e.get("tls.client.server_name") == "denied.test",
    )


def test_client_hello_pipelined_with_the_connect_is_checked_the_same_way(env: Env) -> None:
    assert pipelined_tls_handshake(env.gateway.proxy_port, f"allowed.test:{env.tls.port}", env.ca, "allowed.test") == (
        200,
        True,
    )
    before = env.tls.accepted
    status, completed = pipelined_tls_handshake(
        env.gateway.proxy_port, f"allowed.test:{env.tls.port}", env.ca, "x.wild.test"
    )
    assert (status, completed) == (200, False)
    assert accepted_delta(env.tls, before) == 0


def test_http_in_a_tunnel_is_allowed_when_its_host_is_the_connect_host(env: Env) -> None:
    answer = connect(env.gateway.proxy_port, f"plain.test:{env.plain.port}")
    assert answer.status == 200
    answer.sock.sendall(b"GET /raw HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n")
    data = answer.sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 200")
    answer.sock.close()
    env.gateway.wait_for(
        "egress_decision",
        lambda e: (
            e.get("server.address") == "plain.test"
            and e.get("egress.protocol") == "HTTP"
            and e.get("egress.decision") == "allow"
        ),
    )


# ---- address safety ------------------------------------------------------------------------------------------------


@pytest.mark.netns
def test_name_resolving_to_metadata_address_is_denied(env: Env) -> None:
    require_isolated_network()
    answer = connect(env.gateway.proxy_port, "metadata.test:80")
    assert answer.status == 403
    assert answer.body.startswith(b"blocked_address: ")
    assert "error=destination_ip_prohibited" in answer.headers["proxy-status"]
    assert connect(env.gateway.proxy_port, "2852039166:80").status == 403  # 169.254.169.254 as one number


@pytest.mark.netns
def test_name_resolving_to_private_address_without_cidr_rule_is_denied(env: Env) -> None:
    require_isolated_network()
    answer = connect(env.gateway.proxy_port, "private.test:443")
    assert answer.status == 403
    assert answer.body.startswith(b"private_address: ")


def test_loopback_is_blocked_without_allowed_ranges(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer], ca: TestCA
) -> None:
    origin = make_origin(TLS_ORIGIN, ca.issue("allowed.test").server_context())
    gateway = make_gateway(
        {"identity": {"static": STATIC_IDENTITIES}, "resolver": {"hosts": {"allowed.test": [TLS_ORIGIN]}}},
        {"shop.yaml": POLICIES["shop.yaml"]},
    )
    answer = connect(gateway.proxy_port, f"allowed.test:{origin.port}")
    assert answer.status == 403
    assert answer.body.startswith(b"blocked_address: ")
    assert accepted_delta(origin, 0) == 0


# ---- plain HTTP ----------------------------------------------------------------------------------------------------


def test_plain_http_allowed_without_proxy_credentials_or_hop_by_hop_headers(env: Env) -> None:
    result = curl(
        env.gateway,
        f"http://plain.test:{env.plain.port}/plain",
        "-H",
        "Proxy-Authorization: Basic c2VjcmV0OnRva2Vu",
        "-H",
        "Proxy-Connection: keep-alive",
        "-H",
        "Connection: x-private-hop",
        "-H",
        "X-Private-Hop: 1",
        "-H",
        "X-End-To-End: kept",
    )
    assert result.status == 200, result.stderr
    names = {name.lower() for name, _ in result.json()["headers"]}
    assert "proxy-authorization" not in names
    assert "proxy-connection" not in names
    assert "x-private-hop" not in names
    assert "x-end-to-end" in names


def test_absolute_uri_and_host_header_mismatch_is_denied(env: Env) -> None:
    before = env.plain.accepted
    answer = raw_request(
        env.gateway.proxy_port,
        f"GET http://plain.test:{env.plain.port}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode(),
    )
    assert answer.status == 403
    assert answer.body.startswith(b"host_mismatch: ")
    assert accepted_delta(env.plain, before) == 0


def test_plain_http_keep_alive_is_decided_per_request(env: Env) -> None:
    first = raw_request(
        env.gateway.proxy_port,
        f"GET http://plain.test:{env.plain.port}/one HTTP/1.1\r\nHost: plain.test:{env.plain.port}\r\n\r\n".encode(),
    )
    assert first.status == 200
    first.sock.sendall(f"GET http://denied.test:{env.tls.port}/two HTTP/1.1\r\nHost: denied.test\r\n\r\n".encode())
    second = first.sock.recv(65536)
    assert second.startswith(b"HTTP/1.1 403")
    assert b"denied_by_rule: " in second


def test_https_url_over_plain_proxy_request_is_refused(env: Env) -> None:
    answer = raw_request(
        env.gateway.proxy_port,
        f"GET https://allowed.test:{env.tls.port}/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode(),
    )
    assert answer.status == 400
    assert answer.body.startswith(b"bad_request: ")


def test_garbage_request_line_gets_400_and_the_gateway_keeps_serving(env: Env) -> None:
    answer = raw_request(env.gateway.proxy_port, b"\x00\x01garbage\xff not http at all\r\n\r\n")
    assert answer.status == 400
    result = curl(env.gateway, f"https://allowed.test:{env.tls.port}/after-garbage", ca=env.ca)
    assert result.status == 200


def test_plain_http_to_a_closed_port_is_502(env: Env) -> None:
    answer = raw_request(env.gateway.proxy_port, b"GET http://plain.test:9/ HTTP/1.1\r\nHost: plain.test:9\r\n\r\n")
    assert answer.status == 502
    assert answer.body.startswith(b"connection_refused: ")
    assert "error=connection_refused" in answer.headers["proxy-status"]


# ---- audit mode ----------------------------------------------------------------------------------------------------


def test_audit_mode_policy_allows_and_marks_would_deny(env: Env) -> None:
    result = curl(env.gateway, f"https://allowed.test:{env.tls.port}/audited", source=ANALYTICS_POD, ca=env.ca)
    assert result.status == 200
    line = env.gateway.wait_for(
        "egress_decision",
        lambda e: e.get("client.address") == ANALYTICS_POD and e.get("egress.would_deny") is True,
    )
    assert line["egress.decision"] == "allow"
    assert line["egress.would_deny.reason"] == "denied_by_rule"
    assert line["egress.would_deny.rule"] == "not-allowed-test-any-more"


# ---- process hygiene -------------------------------------------------------------------------------------------------


def test_stdout_carries_only_json_lines(env: Env) -> None:
    for line in env.gateway.stdout_lines:
        json.loads(line)


def test_admin_endpoints(env: Env) -> None:
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{env.gateway.admin_url}/healthz").status_code == 200
        ready = client.get(f"{env.gateway.admin_url}/readyz")
        assert ready.status_code == 200
        metrics = client.get(f"{env.gateway.admin_url}/metrics")
        assert metrics.status_code == 200
        assert "text/plain" in metrics.headers["content-type"]


def test_denied_connect_closes_the_client_connection(env: Env) -> None:
    answer = connect(env.gateway.proxy_port, f"denied.test:{env.tls.port}")
    assert answer.status == 403 and answer.headers["connection"] == "close"
    assert closed_by_peer(answer.sock, timeout=5)


def test_ipv6_literal_destination_allowed_by_cidr(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer], ca: TestCA
) -> None:
    origin = make_origin("::1", ca.issue("::1").server_context(), "v6")
    policy = POLICIES["shop.yaml"].replace("cidrs: [127.0.0.11/32]", "cidrs: [127.0.0.11/32, '::1/128']")
    gateway = make_gateway(
        {"allowed_ranges": ["127.0.0.0/8", "::1/128"], "identity": {"static": STATIC_IDENTITIES}},
        {"shop.yaml": policy},
    )
    answer = connect(gateway.proxy_port, f"[::1]:{origin.port}")
    assert answer.status == 200, answer.body
    with tls_through(answer, ca, "::1") as tls:
        tls.sendall(b"GET /v6 HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200")
    assert origin.accepted == 1
