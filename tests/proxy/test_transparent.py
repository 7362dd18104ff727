"""Transparent mode end to end: clients with no proxy settings, steered to the gateway's name-routed listeners by a
NAT rule (iptables REDIRECT in the test's loopback-only network namespace) or by DNS, get the decisions and records
an explicit CONNECT (or HTTP_PROXY request) to the same name gets.

The "legacy" pod 127.0.0.40 (namespace shop, app=payments) never talks to the proxy port: its outbound TCP to ports
443 and 80 is redirected to the transparent listeners, as an init container's iptables rules would do in a pod. The
gateway's own dials leave from 127.0.0.1 and are not redirected. Origins listen on 443 and 80 of their loopback
address, the ports a transparent connection is decided for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest

from tests.proxy.conftest import closed_by_peer, connect, raw_request
from tests.support.dns_server import ScriptedDNS
from tests.support.gateway import GatewayProcess
from tests.support.netns import require_isolated_network
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

POD = "127.0.0.40"
TLS_ORIGIN = "127.0.0.10"
CIDR_ORIGIN = "127.0.0.11"
PLAIN_ORIGIN = "127.0.0.12"
ATTACKER = "127.0.0.98"  # an address no allowed name resolves to (nothing listens there)

POLICIES = {
    "shop.yaml": """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: legacy, namespace: shop}
spec:
  rules:
    - name: origins
      hosts: [allowed.test, plain.test, "*.wild.test", loopback.test]
    - name: cidr-origin
      cidrs: [127.0.0.11/32]
    - name: no-denied
      action: Deny
      hosts: [denied.test]
""",
}

HOSTS = {
    "allowed.test": [TLS_ORIGIN],
    "denied.test": [TLS_ORIGIN],
    "x.wild.test": [TLS_ORIGIN],
    "cidr.test": [CIDR_ORIGIN],
    "plain.test": [PLAIN_ORIGIN],
    "loopback.test": ["127.0.0.1"],  # outside allowed_ranges: a blocked address
}


@dataclass
class Env:
    gateway: GatewayProcess
    tls: OriginServer
    plain: OriginServer
    ca: TestCA
    tls_port: int
    http_port: int


def _iptables(action: str, port: int, to_port: int) -> None:
    subprocess.run(
        [
            *("iptables", "-t", "nat", action, "OUTPUT", "-p", "tcp", "-s", POD, "--dport", str(port)),
            *("-j", "REDIRECT", "--to-ports", str(to_port)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_isolated_network()  # the NAT rules and ports 443/80 belong to the test's own network namespace
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    base = tmp_path_factory.mktemp("transparent")
    ca = TestCA(base / "ca")
    tls = OriginServer(TLS_ORIGIN, ca.issue("allowed.test", "denied.test", "*.wild.test").server_context(), "tls", 443)
    cidr = OriginServer(CIDR_ORIGIN, ca.issue("cidr.test").server_context(), "cidr", 443)
    plain = OriginServer(PLAIN_ORIGIN, None, "plain", 80)
    for origin in (tls, cidr, plain):
        origin.start()
    config = {
        "allowed_ranges": ["127.0.0.8/29"],  # the origins; 127.0.0.1 stays blocked
        "identity": {"static": [{"cidr": f"{POD}/32", "namespace": "shop", "pod": "legacy-1"}]},
        "resolver": {"hosts": HOSTS},
        "transparent": {"tls_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
    }
    gateway = GatewayProcess(Path(base / "gw"), config, POLICIES).start()
    listening = gateway.wait_for("gateway_listening")["transparent"]
    tls_port = int(listening["transparent-tls"].rsplit(":", 1)[1])
    http_port = int(listening["transparent-http"].rsplit(":", 1)[1])
    rules = [(443, tls_port), (80, http_port)]
    try:
        for port, to_port in rules:
            _iptables("-A", port, to_port)
        yield Env(gateway, tls, plain, ca, tls_port, http_port)
    finally:
        for port, to_port in rules:
            with contextlib.suppress(subprocess.CalledProcessError):
                _iptables("-D", port, to_port)
        gateway.stop()
        for origin in (tls, cidr, plain):
            origin.stop()


# ---- clients and records ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    local_port: int
    status: int  # the origin's HTTP status, 0 when the connection was refused or closed
    body: dict[str, Any] | None = None


def _read_response(sock: socket.socket | ssl.SSLSocket) -> tuple[int, bytes]:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, b""
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head.split(b" ")[1]), body[:length]
    except (OSError, ssl.SSLError):
        return 0, b""


def _https_get(sock: socket.socket, ca: TestCA, sni: str | None, local_port: int) -> Outcome:
    """A TLS handshake (with `sni`, or none) and one GET on an open socket."""
    context = ca.client_context()
    if sni is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=sni) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {sni or TLS_ORIGIN}\r\nConnection: close\r\n\r\n".encode())
            status, body = _read_response(tls)
    except (OSError, ssl.SSLError):
        return Outcome(local_port, 0)
    return Outcome(local_port, status, json.loads(body) if status == 200 else None)


def transparent_tls(ca: TestCA, address: str, sni: str | None, port: int = 443) -> Outcome:
    """A client with no proxy settings: TLS straight to `address` (redirected by NAT when the port is 443)."""
    sock = socket.create_connection((address, port), timeout=10, source_address=(POD, 0))
    return _https_get(sock, ca, sni, sock.getsockname()[1])


def explicit_tls(env: Env, authority: str, sni: str | None) -> Outcome:
    """The same flow through the proxy port: CONNECT `authority`, then TLS with `sni`."""
    answer = connect(env.gateway.proxy_port, authority, source=POD)
    local_port = answer.sock.getsockname()[1]
    if answer.status != 200:
        answer.sock.close()
        return Outcome(local_port, 0)
    return _https_get(answer.sock, env.ca, sni, local_port)


def final_decision(env: Env, local_port: int, timeout: float = 10.0) -> dict[str, Any]:
    """The last decision line of the client connection from `POD:local_port`."""

    def lines() -> list[dict[str, Any]]:
        return env.gateway.find(
            "egress_decision", lambda e: e.get("client.address") == POD and e.get("client.port") == local_port
        )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not lines():
        time.sleep(0.02)
    time.sleep(0.3)  # a later check (the SNI after the CONNECT) writes its line shortly after
    found = lines()
    assert found, f"no decision for {POD}:{local_port}"
    return found[-1]


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # no proxy settings at all
    command = ["curl", "-sS", "--max-time", "15", "--interface", POD, "-w", "\n%{http_code} %{local_port}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)


def _curl_outcome(done: subprocess.CompletedProcess[str]) -> Outcome:
    body, _, codes = done.stdout.rpartition("\n")
    status, _, port = codes.partition(" ")
    return Outcome(int(port or 0), int(status or 0), json.loads(body) if status == "200" else None)


# ---- packet redirect (NAT) --------------------------------------------------------------------------------------


def test_curl_without_proxy_settings_reaches_an_allowed_host_through_the_gateway(env: Env) -> None:
    done = _curl(
        "--cacert", str(env.ca.cert_path), "--resolve", f"allowed.test:443:{TLS_ORIGIN}", "https://allowed.test/"
    )
    outcome = _curl_outcome(done)
    assert outcome.status == 200, done.stderr
    assert outcome.body is not None and outcome.body["sni"] == "allowed.test"
    record = final_decision(env, outcome.local_port)
    assert record["egress.decision"] == "allow"
    assert record["egress.mode"] == "transparent"
    assert record["egress.listener"] == "transparent-tls"
    assert record["server.address"] == "allowed.test" and record["server.port"] == 443
    assert record["tls.client.server_name"] == "allowed.test"


def test_a_forbidden_host_is_denied_with_a_record_and_never_reached(env: Env) -> None:
    accepted = env.tls.accepted
    done = _curl(
        "--cacert", str(env.ca.cert_path), "--resolve", f"denied.test:443:{TLS_ORIGIN}", "https://denied.test/"
    )
    assert done.returncode != 0
    port = int(done.stdout.rpartition("\n")[2].partition(" ")[2] or 0)
    record = final_decision(env, port)
    assert (record["egress.decision"], record["egress.reason"]) == ("deny", "denied_by_rule")
    assert record["egress.mode"] == "transparent"
    assert env.tls.accepted == accepted


NODE_CLIENT = """
const https = require("https");
const fs = require("fs");
const [ca, localAddress, host, servername] = process.argv.slice(1);
const request = https.get(
  {host, port: 443, servername, localAddress, ca: fs.readFileSync(ca), headers: {Host: servername}, agent: false},
  (response) => {
    let body = "";
    response.on("data", (chunk) => (body += chunk));
    const port = request.localPort;
    response.on("end", () => console.log(JSON.stringify({status: response.statusCode, port, body})));
  },
);
request.on("socket", (socket) => socket.on("connect", () => (request.localPort = socket.localPort)));
request.on("error", (error) =>
  console.log(JSON.stringify({status: 0, port: request.localPort || 0, error: error.code})));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize(("name", "expected"), [("allowed.test", "allow"), ("denied.test", "deny")])
def test_node_client_without_an_agent_is_decided_like_any_other(env: Env, name: str, expected: str) -> None:
    """Node's https module ignores HTTPS_PROXY: redirected by NAT, it is decided by its SNI."""
    done = subprocess.run(
        ["node", "-e", NODE_CLIENT, str(env.ca.cert_path), POD, TLS_ORIGIN, name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record = final_decision(env, result["port"])
    assert (record["egress.decision"], record["egress.mode"]) == (expected, "transparent")
    if expected == "allow":
        assert result["status"] == 200 and json.loads(result["body"])["sni"] == name
    else:
        assert result["status"] == 0


def test_python_ssl_client_reaches_a_wildcard_host(env: Env) -> None:
    outcome = transparent_tls(env.ca, TLS_ORIGIN, "x.wild.test")
    assert outcome.status == 200 and outcome.body is not None and outcome.body["sni"] == "x.wild.test"


def test_a_denied_sni_cannot_be_fronted_by_connecting_to_an_allowed_address(env: Env) -> None:
    accepted = env.tls.accepted
    outcome = transparent_tls(env.ca, TLS_ORIGIN, "denied.test")  # allowed.test's address, denied.test's name
    assert outcome.status == 0
    assert final_decision(env, outcome.local_port)["egress.reason"] == "denied_by_rule"
    assert env.tls.accepted == accepted


def test_an_allowed_sni_cannot_steer_the_gateway_to_another_address(env: Env) -> None:
    accepted = env.tls.accepted
    outcome = transparent_tls(env.ca, ATTACKER, "allowed.test")  # allowed name, an address it does not resolve to
    assert outcome.status == 0
    record = final_decision(env, outcome.local_port)
    assert (record["egress.decision"], record["egress.reason"]) == ("deny", "destination_mismatch")
    assert ATTACKER in record["egress.message"]
    assert env.tls.accepted == accepted  # nothing was dialed, not even the name's own address


def test_a_clienthello_without_sni_is_denied_with_a_reason(env: Env) -> None:
    accepted = env.tls.accepted
    outcome = transparent_tls(env.ca, TLS_ORIGIN, None)
    assert outcome.status == 0
    record = final_decision(env, outcome.local_port)
    assert (record["egress.decision"], record["egress.reason"]) == ("deny", "no_sni")
    assert env.tls.accepted == accepted


def test_the_tls_listener_takes_only_tls(env: Env) -> None:
    """Plain HTTP sent to port 443 names its host only in a Host header: the TLS listener does not route by it."""
    accepted = env.tls.accepted
    sock = socket.create_connection((TLS_ORIGIN, 443), timeout=10, source_address=(POD, 0))
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        assert closed_by_peer(sock)
        record = final_decision(env, sock.getsockname()[1])
    assert (record["egress.decision"], record["egress.reason"]) == ("deny", "no_sni")
    assert env.tls.accepted == accepted


def test_plain_http_without_a_host_is_refused_with_a_reason(env: Env) -> None:
    sock = socket.create_connection((PLAIN_ORIGIN, 80), timeout=10, source_address=(POD, 0))
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, _ = _read_response(sock)
        record = final_decision(env, sock.getsockname()[1])
    assert status == 400
    assert (record["egress.decision"], record["egress.reason"]) == ("deny", "no_sni")


def test_plain_http_without_proxy_settings_is_routed_by_its_host(env: Env) -> None:
    outcome = _curl_outcome(_curl("--resolve", f"plain.test:80:{PLAIN_ORIGIN}", "http://plain.test/"))
    assert outcome.status == 200 and outcome.body is not None and outcome.body["origin"] == "plain"
    record = final_decision(env, outcome.local_port)
    assert record["egress.decision"] == "allow"
    assert (record["egress.mode"], record["egress.listener"]) == ("transparent", "transparent-http")


# ---- DNS steering -----------------------------------------------------------------------------------------------


def test_dns_steering_sends_a_client_to_the_listener_and_it_is_decided_by_sni(env: Env) -> None:
    """The cluster DNS answers external names with the gateway's address: the client connects to the listener
    itself (no NAT, so no original destination to check), and the gateway dials what it resolved itself."""
    dns_server = ScriptedDNS({"allowed.test": ["127.0.0.1"], "denied.test": ["127.0.0.1"]}, host="127.0.0.53").start()
    try:
        host, port = dns_server.address.rsplit(":", 1)
        outcomes = {}
        for name in ("allowed.test", "denied.test"):
            answer = dns.query.udp(dns.message.make_query(name, "A"), host, port=int(port), timeout=5)
            address = answer.answer[0][0].address
            assert address == "127.0.0.1"
            outcomes[name] = transparent_tls(env.ca, address, name, port=env.tls_port)
    finally:
        dns_server.stop()
    allowed = outcomes["allowed.test"]
    assert allowed.status == 200 and allowed.body is not None and allowed.body["sni"] == "allowed.test"
    record = final_decision(env, allowed.local_port)
    assert record["egress.decision"] == "allow" and record["network.peer.address"] == TLS_ORIGIN
    assert outcomes["denied.test"].status == 0
    assert final_decision(env, outcomes["denied.test"].local_port)["egress.reason"] == "denied_by_rule"


# ---- the same decisions as the explicit proxy -------------------------------------------------------------------

# case -> (explicit CONNECT authority, SNI; transparent: the address the client connects to, SNI; expected decision,
# the reasons (explicit, transparent) where the two flows cannot name the destination the same way)
TLS_CASES: dict[str, tuple[str, str | None, str, str | None, str, tuple[str, str] | None]] = {
    "allowed": ("allowed.test:443", "allowed.test", TLS_ORIGIN, "allowed.test", "allow", None),
    "denied": ("denied.test:443", "denied.test", TLS_ORIGIN, "denied.test", "deny", None),
    "wildcard": ("x.wild.test:443", "x.wild.test", TLS_ORIGIN, "x.wild.test", "allow", None),
    "cidr": ("cidr.test:443", "cidr.test", CIDR_ORIGIN, "cidr.test", "allow", None),
    "blocked address": ("loopback.test:443", "loopback.test", "127.0.0.1", "loopback.test", "deny", None),
    # Fronting: the explicit client names allowed.test in its CONNECT, the transparent one connects to its address.
    "fronting": (
        "allowed.test:443",
        "denied.test",
        TLS_ORIGIN,
        "denied.test",
        "deny",
        ("sni_mismatch", "denied_by_rule"),
    ),
    # No SNI: nothing names a destination; explicitly, a CONNECT to the bare address no rule allows.
    "no sni": (f"{TLS_ORIGIN}:443", None, TLS_ORIGIN, None, "deny", ("no_matching_rule", "no_sni")),
}


@pytest.mark.parametrize("case", list(TLS_CASES))
def test_transparent_and_explicit_modes_decide_alike(env: Env, case: str) -> None:
    authority, explicit_sni, address, sni, expected, reasons = TLS_CASES[case]
    explicit = final_decision(env, explicit_tls(env, authority, explicit_sni).local_port)
    transparent = final_decision(env, transparent_tls(env.ca, address, sni).local_port)
    assert transparent["egress.mode"] == "transparent" and "egress.mode" not in explicit
    assert explicit["egress.decision"] == transparent["egress.decision"] == expected, (explicit, transparent)
    if reasons is None:
        assert explicit["egress.reason"] == transparent["egress.reason"]
    else:
        assert (explicit["egress.reason"], transparent["egress.reason"]) == reasons


def test_plain_http_with_a_mismatched_host_is_denied_in_both_modes(env: Env) -> None:
    """Explicitly, an absolute URL whose Host names another host; transparently, a kept-alive request whose Host
    names another host than the connection's first request."""
    answer = raw_request(
        env.gateway.proxy_port, b"GET http://plain.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n", source=POD
    )
    explicit = final_decision(env, answer.sock.getsockname()[1])
    answer.sock.close()
    sock = socket.create_connection((PLAIN_ORIGIN, 80), timeout=10, source_address=(POD, 0))
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: plain.test\r\n\r\n")
        status, _ = _read_response(sock)
        assert status == 200
        requests_before = len(env.plain.requests)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: denied.test\r\n\r\n")
        assert closed_by_peer(sock)
        transparent = final_decision(env, sock.getsockname()[1])
    assert len(env.plain.requests) == requests_before
    assert explicit["egress.decision"] == transparent["egress.decision"] == "deny"
    assert explicit["egress.reason"] == transparent["egress.reason"] == "host_mismatch", (explicit, transparent)


# ---- one registry for every listener ---------------------------------------------------------------------------


def _closed(tls: ssl.SSLSocket, timeout: float) -> bool:
    """True if the gateway closes the tunnel (EOF, reset, or TLS cut short) within `timeout`."""
    tls.settimeout(timeout)
    try:
        while tls.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset, or EOF without close_notify (ssl.SSLEOFError)
        pass
    return True


def test_sessions_of_two_listeners_open_at_once_are_each_revoked(env: Env, tmp_path: Path) -> None:
    """A session of the proxy port and one of a name-routed listener, both open, are two entries of the one registry:
    a policy change revokes both (were their ids counted per listener, one would hide the other, which then outlives
    the policy that denies it)."""
    config = {
        "allowed_ranges": ["127.0.0.8/29"],
        "identity": {"static": [{"cidr": f"{POD}/32", "namespace": "shop", "pod": "legacy-1"}]},
        "resolver": {"hosts": HOSTS},
        "transparent": {"tls_listen": "127.0.0.1:0"},
    }
    gateway = GatewayProcess(tmp_path / "gw", config, POLICIES).start()
    tunnels: list[ssl.SSLSocket] = []
    try:
        listening = gateway.wait_for("gateway_listening")["transparent"]
        tls_port = int(listening["transparent-tls"].rsplit(":", 1)[1])
        context = env.ca.client_context()
        for _ in range(2):  # each listener's first sessions, interleaved
            steered = socket.create_connection(("127.0.0.1", tls_port), timeout=10, source_address=(POD, 0))
            tunnels.append(context.wrap_socket(steered, server_hostname="allowed.test"))
            answer = connect(gateway.proxy_port, f"allowed.test:{env.tls.port}", source=POD)
            assert answer.status == 200
            tunnels.append(context.wrap_socket(answer.sock, server_hostname="allowed.test"))
        ports = {tls.getsockname()[1] for tls in tunnels}
        gateway.write_policy("shop.yaml", POLICIES["shop.yaml"].replace("allowed.test, ", ""))
        assert all(_closed(tls, timeout=5) for tls in tunnels), "a tunnel to a now-denied host stays open"

        def revoked() -> set[int]:
            found = gateway.find("egress_decision", lambda e: e.get("egress.reason") == "revoked")
            return {int(e["client.port"]) for e in found}

        deadline = time.monotonic() + 10
        while revoked() != ports and time.monotonic() < deadline:
            time.sleep(0.05)
        assert revoked() == ports
    finally:
        for tls in tunnels:
            tls.close()
        gateway.stop()
