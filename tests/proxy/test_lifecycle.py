"""The gateway over time: readiness, hot reload and revocation of open tunnels, client timeouts, pinned DNS
(rebinding), resolver failures, and the SIGTERM drain."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.proxy.conftest import STATIC_IDENTITIES, closed_by_peer, connect, raw_request, tls_through
from tests.support.dns_server import ScriptedDNS
from tests.support.gateway import GatewayProcess
from tests.support.netns import require_isolated_network
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

ORIGIN = "127.0.0.20"
OTHER_ORIGIN = "127.0.0.21"


def policy(*hosts: str) -> str:
    listed = ", ".join(hosts)
    return f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: payments, namespace: shop}}
spec:
  rules:
    - name: origins
      hosts: [{listed}]
"""


@pytest.fixture
def origins(make_origin: Callable[..., OriginServer], ca: TestCA) -> tuple[OriginServer, OriginServer]:
    first = make_origin(ORIGIN, ca.issue("api.test", ORIGIN).server_context(), "api")
    second = make_origin(OTHER_ORIGIN, ca.issue("other.test").server_context(), "other")
    return first, second


def base_config(**extra: object) -> dict[str, object]:
    config: dict[str, object] = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"hosts": {"api.test": [ORIGIN], "other.test": [OTHER_ORIGIN]}},
    }
    config.update(extra)
    return config


def request_over(tls: socket.socket, path: str) -> bytes:
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"}" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- readiness -----------------------------------------------------------------------------------------------------


def test_before_policies_load_every_connection_gets_503(
    make_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = make_gateway(base_config(policies_path=str(tmp_path / "does-not-exist")))
    answer = connect(gateway.proxy_port, "api.test:443")
    assert answer.status == 503
    assert answer.body.startswith(b"policies_not_loaded: ")
    assert "error=proxy_internal_error" in answer.headers["proxy-status"]
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{gateway.admin_url}/healthz").status_code == 200
        ready = client.get(f"{gateway.admin_url}/readyz")
        assert ready.status_code == 503 and "policies_not_loaded" in ready.text


# ---- hot reload ----------------------------------------------------------------------------------------------------


def test_policy_edit_applies_to_new_connections_and_revokes_open_tunnels(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer], ca: TestCA
) -> None:
    api, other = origins
    gateway = make_gateway(base_config(), {"shop.yaml": policy("api.test", "other.test")})
    revoked_tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{api.port}"), ca, "api.test")
    kept_tunnel = tls_through(connect(gateway.proxy_port, f"other.test:{other.port}"), ca, "other.test")
    assert b'"/before"' in request_over(revoked_tunnel, "/before")
    assert b'"/before"' in request_over(kept_tunnel, "/before")

    gateway.write_policy("shop.yaml", policy("other.test"))
    started = time.monotonic()
    assert closed_by_peer(revoked_tunnel, timeout=5), "the tunnel to a now-denied host stays open"
    took = time.monotonic() - started
    assert took < 1.5, f"revocation took {took:.2f} s"  # contract: 1 s; margin for a loaded CI machine
    answer = connect(gateway.proxy_port, f"api.test:{api.port}")
    assert answer.status == 403 and answer.body.startswith(b"no_matching_rule: ")
    # The tunnel the new policy still allows is not dropped.
    assert b'"/after"' in request_over(kept_tunnel, "/after")
    gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "revoked")
    kept_tunnel.close()


def test_new_connections_follow_a_policy_that_now_allows(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer], ca: TestCA
) -> None:
    api, _ = origins
    gateway = make_gateway(base_config(), {"shop.yaml": policy("other.test")})
    assert connect(gateway.proxy_port, f"api.test:{api.port}").status == 403
    started = time.monotonic()
    gateway.write_policy("shop.yaml", policy("api.test"))
    assert wait_until(lambda: connect(gateway.proxy_port, f"api.test:{api.port}").status == 200, timeout=3)
    took = time.monotonic() - started
    print(f"policy edit -> new connections allowed after {took:.2f} s")
    assert took < 1.5  # the contract is 1 s; the margin absorbs a loaded CI machine


# ---- client timeouts -----------------------------------------------------------------------------------------------


def test_tunnel_without_client_hello_is_closed_and_never_dialed(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer]
) -> None:
    api, _ = origins
    gateway = make_gateway(base_config(timeouts={"client_hello_s": 0.5}), {"shop.yaml": policy("api.test")})
    answer = connect(gateway.proxy_port, f"api.test:{api.port}")
    assert answer.status == 200
    started = time.monotonic()
    assert closed_by_peer(answer.sock, timeout=5)
    assert time.monotonic() - started < 3
    assert api.accepted == 0
    gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "client_timeout")


def test_silent_client_is_closed_after_the_request_timeout(make_gateway: Callable[..., GatewayProcess]) -> None:
    gateway = make_gateway(base_config(timeouts={"client_request_s": 0.5}), {"shop.yaml": policy("api.test")})
    sock = socket.create_connection(("127.0.0.1", gateway.proxy_port), source_address=("127.0.0.2", 0))
    assert closed_by_peer(sock, timeout=5)
    line = gateway.wait_for("client_request_timeout")
    assert line["received_bytes"] == 0 and line["received"] == "nothing"


def test_a_partial_plain_http_head_is_logged_as_such_at_the_request_timeout(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = make_gateway(base_config(timeouts={"client_request_s": 0.5}), {"shop.yaml": policy("api.test")})
    partial = b"GET http://api.test/ HTTP/1.1\r\nHost: api.te"
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(partial)
        assert closed_by_peer(sock, timeout=5)
    line = gateway.wait_for("client_request_timeout")
    assert line["received_bytes"] == len(partial) and line["received"] == "partial_http_request"


# ---- DNS -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def scripted_dns() -> Iterator[Callable[..., ScriptedDNS]]:
    servers: list[ScriptedDNS] = []

    def make(answers: dict[str, list[str]]) -> ScriptedDNS:
        server = ScriptedDNS(answers).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.mark.netns
def test_dns_rebinding_connects_only_to_the_checked_address(
    make_gateway: Callable[..., GatewayProcess],
    origins: tuple[OriginServer, OriginServer],
    scripted_dns: Callable[..., ScriptedDNS],
    ca: TestCA,
) -> None:
    require_isolated_network()
    api, _ = origins
    dns = scripted_dns({"api.test": [ORIGIN, "169.254.169.254"]})  # 1st answer fine, then the metadata address
    gateway = make_gateway(
        base_config(resolver={"nameservers": [dns.address], "timeout_s": 2}), {"shop.yaml": policy("api.test")}
    )
    tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{api.port}"), ca, "api.test")
    assert b'"/pinned"' in request_over(tunnel, "/pinned")
    tunnel.close()
    assert dns.a_queries("api.test") == 1, "the name was looked up more than once for one connection"
    assert api.peers and all(peer[0] == "127.0.0.1" for peer in api.peers)
    # The rebound answer is checked like any other: denied, and nothing is dialed.
    second = connect(gateway.proxy_port, f"api.test:{api.port}")
    assert second.status == 403 and second.body.startswith(b"blocked_address: ")
    assert api.accepted == 1


def test_unknown_name_is_502_dns_error(
    make_gateway: Callable[..., GatewayProcess], scripted_dns: Callable[..., ScriptedDNS]
) -> None:
    dns = scripted_dns({})
    gateway = make_gateway(
        base_config(resolver={"nameservers": [dns.address], "timeout_s": 2}), {"shop.yaml": policy("missing.test")}
    )
    answer = connect(gateway.proxy_port, "missing.test:443")
    assert answer.status == 502
    assert answer.body.startswith(b"dns_error: ")
    assert "error=dns_error" in answer.headers["proxy-status"]


def test_silent_nameserver_is_502_dns_timeout(make_gateway: Callable[..., GatewayProcess]) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        gateway = make_gateway(
            base_config(resolver={"nameservers": [address], "timeout_s": 0.5}), {"shop.yaml": policy("slow.test")}
        )
        started = time.monotonic()
        answer = connect(gateway.proxy_port, "slow.test:443")
        assert answer.status == 502
        assert answer.body.startswith(b"dns_timeout: ")
        assert "error=dns_timeout" in answer.headers["proxy-status"]
        assert time.monotonic() - started < 3
    finally:
        silent.close()


def test_denied_names_are_never_looked_up(
    make_gateway: Callable[..., GatewayProcess], scripted_dns: Callable[..., ScriptedDNS]
) -> None:
    dns = scripted_dns({"secret.test": ["127.0.0.20"]})
    gateway = make_gateway(
        base_config(resolver={"nameservers": [dns.address]}),
        {"shop.yaml": policy("api.test") + "    - name: no-secrets\n      action: Deny\n      hosts: [secret.test]\n"},
    )
    assert connect(gateway.proxy_port, "secret.test:443").status == 403
    assert dns.queries == []


# ---- shutdown ------------------------------------------------------------------------------------------------------


def test_sigterm_stops_accepting_drains_open_tunnels_and_exits_0(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer], ca: TestCA
) -> None:
    api, _ = origins
    gateway = make_gateway(base_config(shutdown_grace_s=10), {"shop.yaml": policy("api.test")})
    tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{api.port}"), ca, "api.test")
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    gateway.wait_for("gateway_draining")
    assert wait_until(lambda: _refused(gateway.proxy_port), timeout=5), "still accepting after SIGTERM"
    assert b'"/during-drain"' in request_over(tunnel, "/during-drain")  # the open tunnel keeps working
    tunnel.close()
    assert gateway.process.wait(timeout=10) == 0


def test_sigterm_closes_tunnels_left_open_after_the_grace_period(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer], ca: TestCA
) -> None:
    api, _ = origins
    gateway = make_gateway(base_config(shutdown_grace_s=1), {"shop.yaml": policy("api.test")})
    tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{api.port}"), ca, "api.test")
    assert gateway.process is not None
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    assert closed_by_peer(tunnel, timeout=10)
    assert gateway.process.wait(timeout=10) == 0
    assert 0.8 < time.monotonic() - started < 6


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_upstream_refused_closes_the_tunnel_and_is_recorded(
    make_gateway: Callable[..., GatewayProcess], ca: TestCA
) -> None:
    gateway = make_gateway(base_config(), {"shop.yaml": policy("api.test")})
    answer = connect(gateway.proxy_port, "api.test:9")  # nothing listens on port 9
    assert answer.status == 200
    with pytest.raises((OSError, ConnectionError)):
        tls_through(answer, ca, "api.test")
    gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "connection_refused")


def test_plain_http_denial_is_answered_on_keep_alive_without_dialing(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer]
) -> None:
    api, _ = origins
    gateway = make_gateway(base_config(), {"shop.yaml": policy("other.test")})
    request = f"GET http://api.test:{api.port}/ HTTP/1.1\r\nHost: api.test\r\n\r\n"
    answer = raw_request(gateway.proxy_port, request.encode())
    assert answer.status == 403
    assert api.accepted == 0


def _unaccepting_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: further SYNs are dropped, so a connect hangs (no RST, no accept)."""
    listener = socket.socket()
    listener.bind(("127.0.0.30", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    return listener, fillers


def test_upstream_connect_timeout(make_gateway: Callable[..., GatewayProcess], ca: TestCA) -> None:
    listener, fillers = _unaccepting_listener()
    port = listener.getsockname()[1]
    try:
        gateway = make_gateway(
            base_config(resolver={"hosts": {"slow.test": ["127.0.0.30"]}}, timeouts={"connect_s": 0.5}),
            {"shop.yaml": policy("slow.test")},
        )
        started = time.monotonic()
        answer = raw_request(
            gateway.proxy_port, f"GET http://slow.test:{port}/ HTTP/1.1\r\nHost: slow.test:{port}\r\n\r\n".encode()
        )
        assert answer.status == 504  # connection_timeout (responses.py), with Proxy-Status
        assert time.monotonic() - started < 5
        tunnel = connect(gateway.proxy_port, f"slow.test:{port}")
        assert tunnel.status == 200
        with pytest.raises((OSError, ConnectionError)):
            tls_through(tunnel, ca, "slow.test")
        gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "connection_timeout")
    finally:
        for sock in (listener, *fillers):
            sock.close()


def test_no_certificate_authority_is_ever_created(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer], ca: TestCA, tmp_path: Path
) -> None:
    api, _ = origins
    data_dir = tmp_path / "data"
    gateway = make_gateway(base_config(data_dir=str(data_dir)), {"shop.yaml": policy("api.test")})
    tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{api.port}"), ca, "api.test")
    assert b'"/x"' in request_over(tunnel, "/x")
    tunnel.close()
    assert gateway.stop() == 0
    assert not [p for p in data_dir.rglob("*") if p.is_file()], "TLS is never intercepted: no CA, no certificates"


def test_environment_overrides_the_config_file(
    make_gateway: Callable[..., GatewayProcess], origins: tuple[OriginServer, OriginServer], ca: TestCA
) -> None:
    api, _ = origins
    config = base_config(resolver={"hosts": {"api.test": ["127.0.0.99"]}})  # wrong address in the file...
    gateway = make_gateway(
        config,
        {"shop.yaml": policy("api.test")},
        extra_env={"EGRESS_GATEWAY_RESOLVER__HOSTS": '{"api.test": ["127.0.0.20"]}'},  # ...fixed by the environment
    )
    tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{api.port}"), ca, "api.test")
    assert b'"/env"' in request_over(tunnel, "/env")
    tunnel.close()


class SlowDNS(ScriptedDNS):
    """Answers like `ScriptedDNS`, each answer `delay_s` late."""

    delay_s = 0.8

    def respond(self, query: object, raw: bytes, name: str, qtype: str) -> bytes | None:
        time.sleep(self.delay_s)
        return super().respond(query, raw, name, qtype)  # type: ignore[arg-type]


def _active_tunnels(gateway: GatewayProcess) -> float:
    text = httpx.get(f"{gateway.admin_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("egress_gateway_active_tunnels "):
            return float(line.split()[1])
    raise AssertionError("no egress_gateway_active_tunnels sample")


def test_client_leaving_during_a_pending_decision_leaves_a_complete_record_and_no_tunnel(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    dns = SlowDNS({"late.test": [ORIGIN]}).start()
    try:
        gateway = make_gateway(
            base_config(resolver={"nameservers": [dns.address], "timeout_s": 5}), {"shop.yaml": policy("late.test")}
        )
        sock = socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=5, source_address=("127.0.0.2", 0))
        sock.sendall(b"CONNECT late.test:443 HTTP/1.1\r\nHost: late.test:443\r\n\r\n")
        time.sleep(0.2)
        sock.close()  # before the DNS answer arrives
        record = gateway.wait_for("egress_decision", lambda e: e.get("server.address") == "late.test")
        assert record["egress.decision"] == "allow"  # decided and recorded although nobody waits for it
        deadline = time.monotonic() + 5
        while _active_tunnels(gateway) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _active_tunnels(gateway) == 0, "the record was closed: no tunnel counted as open"
        assert not any(e.get("event") == "tunnel_failed" for e in gateway.events)
    finally:
        dns.stop()
