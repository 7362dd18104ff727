"""Hostile ClientHellos inside an established CONNECT tunnel, and clients that are slow on purpose.

A tunnel's first bytes are read by the gateway without any upstream connection; only a ClientHello whose SNI the
policy allows opens one. Fragmentation over records or TCP segments must not change the decision; malformed SNI
closes the tunnel with a `bad_request` record; silence is cut by `timeouts.client_hello_s`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.hardening.conftest import Env, accepted_after
from tests.hardening.tlsbytes import crafted_client_hello, handshake_with_first_flight, real_client_hello, refragment
from tests.proxy.conftest import closed_by_peer, connect
from tests.support.tls import handmade_client_hello

pytestmark = pytest.mark.slow

Sender = Callable[[socket.socket, bytes], None]


def _tunnel(env: Env, authority: str, source: str) -> socket.socket:
    answer = connect(env.gateway.proxy_port, authority, source=source)
    assert answer.status == 200, answer.body
    return answer.sock


def _send_in_records(size: int) -> Sender:
    def send(sock: socket.socket, first: bytes) -> None:
        sock.sendall(refragment(first, size))

    return send


def _send_in_segments(size: int, pause: float) -> Sender:
    def send(sock: socket.socket, first: bytes) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(first), size):
            sock.sendall(first[start : start + size])
            time.sleep(pause)

    return send


@pytest.mark.parametrize(
    ("shape", "sender"),
    [
        ("records_of_16_bytes", _send_in_records(16)),
        ("records_of_1_byte", _send_in_records(1)),
        ("tcp_segments_of_7_bytes", _send_in_segments(7, 0.002)),
        ("records_and_segments", lambda s, f: _send_in_segments(3, 0.001)(s, refragment(f, 40))),
    ],
)
def test_fragmented_client_hello_is_read_whole_and_allowed(env: Env, shape: str, sender: Sender) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    # A real handshake that completes verifies the origin's own certificate: the hello arrived intact.
    tls = handshake_with_first_flight(sock, env.ca.client_context(), "allowed.test", sender)
    assert tls.version() is not None
    sock.close()
    record = env.decision(source, "allowed_by_rule")
    hello = env.wait_decision(
        source,
        lambda e: e.get("tls.client.server_name") == "allowed.test",
    )
    assert record["egress.decision"] == "allow"
    assert hello["egress.tls_ech"] is False  # OpenSSL in Python sends no encrypted_client_hello
    assert accepted_after(env.tls, before) == 1
    env.assert_still_serves()


def test_alpn_is_recorded_as_an_escaped_array_and_ech_presence_is_recorded(env: Env) -> None:
    source = env.fresh_source()
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    sock.sendall(handmade_client_hello("allowed.test", [b"h2", b"evil\r\n\x1b[2J", b"a,b"], ech=True))
    record = env.wait_decision(source, lambda e: e.get("tls.client.server_name") == "allowed.test")
    sock.close()
    assert record["egress.decision"] == "allow"
    # One item per protocol id (a comma stays inside its id); control characters written as \xNN, never raw.
    assert record["egress.tls_alpn"] == ["h2", "evil\\x0d\\x0a\\x1b[2J", "a,b"]
    assert record["egress.tls_ech"] is True


@pytest.mark.parametrize("size", [1, 16, 100])
def test_fragmented_client_hello_cannot_smuggle_a_denied_sni(env: Env, size: int) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    hello = real_client_hello(env.ca.client_context(), "denied.test").first_flight
    sock.sendall(refragment(hello, size))
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(
        source,
        lambda e: e.get("tls.client.server_name") == "denied.test",
    )
    assert record["egress.decision"] == "deny"
    assert record["egress.reason"] in ("sni_mismatch", "denied_by_rule")
    assert accepted_after(env.tls, before) == 0
    env.assert_still_serves()


# name -> (CONNECT host, server_name entries, second SNI extension, expected reason)
MALFORMED_SNI = {
    "two_host_names": ([(0, b"allowed.test"), (0, b"denied.test")], False),
    "two_sni_extensions": ([(0, b"allowed.test")], True),
    "empty_host_name": ([(0, b"")], False),
    "no_host_name_entry": ([(1, b"allowed.test")], False),
    "nul_in_host_name": ([(0, b"allowed.test\x00.denied.test")], False),
    "non_ascii_host_name": ([(0, "bücher.test".encode())], False),
    "space_in_host_name": ([(0, b"allowed.test denied.test")], False),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SNI))
def test_malformed_sni_closes_the_tunnel_with_bad_request(env: Env, case: str) -> None:
    names, twice = MALFORMED_SNI[case]
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    sock.sendall(crafted_client_hello(names, extra_sni_extension=twice))
    assert closed_by_peer(sock)
    sock.close()
    record = env.decision(source, "bad_request")
    assert "ClientHello" in record.get("egress.message", "ClientHello")
    assert accepted_after(env.tls, before) == 0
    env.assert_still_serves()


@pytest.mark.parametrize("sni", [b"ALLOWED.TEST", b"allowed.test.", b"Allowed.Test."])
def test_sni_case_and_trailing_dot_match_the_connect_host(env: Env, sni: bytes) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    sock.sendall(crafted_client_hello([(0, sni)]))
    # The hand-built hello reaches the origin (which then fails the handshake): the decision is what matters.
    env.wait_decision(
        source,
        lambda e: e.get("tls.client.server_name") == sni.decode() and e.get("egress.decision") == "allow",
    )
    sock.close()
    assert accepted_after(env.tls, before) == 1
    env.assert_still_serves()


@pytest.mark.parametrize("sni", [b"DENIED.TEST", b"denied.test."])
def test_sni_spelling_does_not_dodge_a_deny_rule(env: Env, sni: bytes) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    sock.sendall(crafted_client_hello([(0, sni)]))
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.decision") == "deny")
    assert record["egress.reason"] in ("sni_mismatch", "denied_by_rule")
    assert accepted_after(env.tls, before) == 0


def test_ip_address_sni_for_a_named_connect_is_denied(env: Env) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    sock.sendall(crafted_client_hello([(0, b"127.0.0.10")]))
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.decision") == "deny")
    assert record["egress.reason"] in ("sni_mismatch", "bad_request")
    assert accepted_after(env.tls, before) == 0
    env.assert_still_serves()


def test_truncated_client_hello_then_silence_is_cut_at_the_hello_timeout(env: Env) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    hello = real_client_hello(env.ca.client_context(), "allowed.test").first_flight
    started = time.monotonic()
    sock.sendall(hello[: len(hello) // 2])
    assert closed_by_peer(sock, timeout=10)
    assert time.monotonic() - started < 3 + 3  # client_hello_s = 3
    sock.close()
    record = env.decision(source, "client_timeout")
    # The record tells a partial ClientHello from a silent client.
    assert record["egress.timeout"] == "client_hello"
    assert record["egress.timeout.received_bytes"] == len(hello) // 2
    assert record["egress.timeout.received"] == "partial_tls_client_hello"
    assert f"sent {len(hello) // 2} bytes, a TLS ClientHello that is not complete" in record["egress.message"]
    assert accepted_after(env.tls, before) == 0
    env.assert_still_serves()


def test_silent_tunnel_is_cut_at_the_hello_timeout(env: Env) -> None:
    source = env.fresh_source()
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    assert closed_by_peer(sock, timeout=10)
    sock.close()
    record = env.decision(source, "client_timeout")
    assert record["egress.timeout.received_bytes"] == 0
    assert record["egress.timeout.received"] == "nothing"
    assert "the client sent no data within" in record["egress.message"]


def test_oversized_client_hello_is_refused(env: Env) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    # A handshake header announcing a 16 MB ClientHello: refused at once, nothing is buffered towards it.
    sock.sendall(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")
    assert closed_by_peer(sock)
    sock.close()
    env.decision(source, "bad_request")
    assert accepted_after(env.tls, before) == 0


def test_sslv2_style_hello_in_a_tunnel_is_opaque_tcp_and_refused_without_a_tcp_rule(env: Env) -> None:
    """Not TLS by its first byte (no handshake record), not HTTP: opaque TCP, which the hostile namespace's rule does
    not list (`protocols` defaults to TLS and HTTP). Closed with a `protocol_not_allowed` record; never dialed."""
    source = env.fresh_source()
    before = env.tls.accepted
    sock = _tunnel(env, f"allowed.test:{env.tls.port}", source)
    sock.sendall(bytes.fromhex("802e0103010015000000100100800300800700c006004002008004008000") + bytes(16))
    assert closed_by_peer(sock)
    sock.close()
    record = env.decision(source, "protocol_not_allowed")
    assert record["egress.protocol"] == "TCP"
    assert accepted_after(env.tls, before) == 0
    env.assert_still_serves()
