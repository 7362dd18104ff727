"""Hostile request heads against the running gateway over raw sockets.

Each case states its defined outcome: the status (or a close), the one-line reason, the `Proxy-Status` header, the
decision record (log line) with its reason, that nothing reached an origin, and that the gateway then still serves
a well-behaved client in another namespace.
"""

from __future__ import annotations

import random
import socket
import time

import pytest

from tests.hardening.conftest import Env, accepted_after
from tests.proxy.conftest import closed_by_peer, raw_request

pytestmark = pytest.mark.slow

_rng = random.Random(5)
RANDOM_BYTES = bytes(_rng.randrange(256) for _ in range(2048)) + b"\r\n\r\n"

# name -> (request, status, reason); "{p}" is the plain origin's port.
CASES: dict[str, tuple[bytes, int, str]] = {
    "binary_request_line": (b"\x00\x01\x02\x03garbage\xff\r\n\r\n", 400, "bad_request"),
    "random_bytes": (RANDOM_BYTES, 400, "bad_request"),
    "text_that_is_not_http": (b"hello gateway, how are you\r\n\r\n", 400, "bad_request"),
    "method_only": (b"GET\r\n\r\n", 400, "bad_request"),
    "unknown_http_version": (b"GET http://plain.test:{p}/ HTTP/9.9\r\nHost: plain.test\r\n\r\n", 400, "bad_request"),
    "absurdly_long_authority": (b"CONNECT " + b"a" * 100_000 + b".test:443 HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
    "overlong_dns_name": (b"CONNECT " + b"a" * 300 + b".test:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "connect_without_port": (b"CONNECT allowed.test HTTP/1.1\r\nHost: allowed.test\r\n\r\n", 400, "bad_request"),
    "connect_port_0": (b"CONNECT allowed.test:0 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "connect_port_65536": (b"CONNECT allowed.test:65536 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "connect_port_not_numeric": (b"CONNECT allowed.test:https HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "connect_negative_port": (b"CONNECT allowed.test:-443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "userinfo_in_authority": (b"CONNECT user:secret@allowed.test:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "userinfo_in_absolute_url": (
        b"GET http://allowed.test@denied.test:{p}/ HTTP/1.1\r\nHost: denied.test\r\n\r\n",
        400,
        "bad_request",
    ),
    "percent_encoded_host": (b"CONNECT allowed%2etest:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "utf8_unicode_host": ("CONNECT bücher.test:443 HTTP/1.1\r\n\r\n".encode(), 400, "bad_request"),
    "nul_in_connect_host": (b"CONNECT allowed.test\x00.denied.test:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "crlf_in_connect_host": (b"CONNECT allowed.test\r\nHost: denied.test:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "nul_in_host_header": (
        b"GET http://plain.test:{p}/ HTTP/1.1\r\nHost: plain.test\x00denied.test\r\n\r\n",
        400,
        "bad_request",
    ),
    "bare_cr_in_host_header": (
        b"GET http://plain.test:{p}/ HTTP/1.1\r\nHost: plain.test\rX-Injected: 1\r\n\r\n",
        400,
        "bad_request",
    ),
    "duplicate_host_headers": (
        b"GET http://plain.test:{p}/ HTTP/1.1\r\nHost: plain.test:{p}\r\nHost: denied.test\r\n\r\n",
        400,
        "bad_request",
    ),
    "origin_form_request": (b"GET / HTTP/1.1\r\nHost: plain.test:{p}\r\n\r\n", 400, "bad_request"),
    "http2_prior_knowledge": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "bad_request"),
    "sslv2_style_hello": (
        bytes.fromhex("802e0103010015000000100100800300800700c006004002008004008000") * 2,
        400,
        "bad_request",
    ),
    "too_many_headers": (
        b"GET http://plain.test:{p}/ HTTP/1.1\r\nHost: plain.test\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(40))
        + b"\r\n",
        431,
        "headers_too_large",
    ),
    "huge_header": (
        b"GET http://plain.test:{p}/ HTTP/1.1\r\nHost: plain.test\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        431,
        "headers_too_large",
    ),
}

SMUGGLING: dict[str, bytes] = {
    "cl_and_te": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "te_obs_fold": b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": b"Transfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "te_unknown_coding": b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_chunked_not_last": b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te_twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl_twice_differing": b"Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    "cl_signed": b"Content-Length: +4\r\n\r\nabcd",
    "cl_list": b"Content-Length: 4, 4\r\n\r\nabcd",
    "te_on_http_1_0": b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}


def _send(env: Env, request: bytes, source: str) -> tuple[int, bytes, dict[str, str]]:
    answer = raw_request(env.gateway.proxy_port, request.replace(b"{p}", str(env.plain.port).encode()), source)
    answer.sock.close()
    return answer.status, answer.body, answer.headers


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_request_gets_its_defined_answer(env: Env, case: str) -> None:
    request, status, reason = CASES[case]
    source = env.fresh_source()
    before = (env.plain.accepted, env.tls.accepted)
    got, body, headers = _send(env, request, source)
    assert got == status, body
    assert body.startswith(f"{reason}: ".encode()) and body.count(b"\n") == 1
    assert headers["proxy-status"].startswith("egress-gateway; error=http_request_error; details=")
    assert headers.get("connection") == "close"
    record = env.decision(source, reason)
    assert record["egress.decision"] == "deny"
    assert accepted_after(env.plain, before[0]) == 0 and env.tls.accepted == before[1]
    env.assert_still_serves()


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_request_smuggling_shapes_are_refused_before_any_upstream_byte(env: Env, case: str) -> None:
    source = env.fresh_source()
    version = b"HTTP/1.0" if case == "te_on_http_1_0" else b"HTTP/1.1"
    head = b"POST http://plain.test:{p}/ " + version + b"\r\nHost: plain.test:{p}\r\n"
    smuggled = b"GET http://denied.test:{p}/ HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    before = env.plain.accepted
    status, body, _ = _send(env, head + SMUGGLING[case] + smuggled, source)
    assert status == 400, body
    assert body.startswith(b"bad_request: malformed request: ")
    env.decision(source, "bad_request")
    assert accepted_after(env.plain, before) == 0
    assert all(d["egress.decision"] == "deny" for d in env.decisions(source))
    env.assert_still_serves()


def test_pipelined_second_request_is_decided_on_its_own(env: Env) -> None:
    source = env.fresh_source()
    port = env.plain.port
    allowed = f"GET http://plain.test:{port}/first HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 0\r\n\r\n"
    denied = f"GET http://denied.test:{port}/second HTTP/1.1\r\nHost: denied.test:{port}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", env.gateway.proxy_port), timeout=10, source_address=(source, 0))
    sock.sendall((allowed + denied).encode())
    received = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and received.count(b"HTTP/1.1 ") < 2:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    # The second request is either answered on its own (403 denied_by_rule) or the connection ends; it never
    # rides along with the first one.
    if received.count(b"HTTP/1.1 ") >= 2:
        assert b"HTTP/1.1 403" in received and b"denied_by_rule: " in received
    paths = [r["path"] for r in env.plain.requests]
    assert "/second" not in paths and not any(
        v == f"denied.test:{port}" for r in env.plain.requests for k, v in r["headers"] if k.lower() == "host"
    )
    env.assert_still_serves()


def test_endless_header_is_refused_while_it_is_still_arriving(env: Env) -> None:
    source = env.fresh_source()
    sock = socket.create_connection(("127.0.0.1", env.gateway.proxy_port), timeout=10, source_address=(source, 0))
    sock.sendall(b"GET http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\n")
    refused = b""
    try:
        for _ in range(64):  # at most 64 x 512 B = 32 KB sent, well past the 8 KB limit; never a blank line
            sock.sendall(b"X-Trickle: " + b"a" * 500 + b"\r\n")
            time.sleep(0.005)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            refused += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    assert refused.startswith(b"HTTP/1.1 431"), refused[:200]
    env.decision(source, "headers_too_large")
    env.assert_still_serves()


def test_endless_header_of_a_kept_alive_request_after_a_chunked_body_is_refused_while_it_is_still_arriving(
    env: Env,
) -> None:
    """Every request head of a plain-HTTP connection is bounded, not only the first: the session reads the request
    stream (Content-Length and chunked framing) and checks each head before mitmproxy buffers it."""
    source = env.fresh_source()
    port = env.plain.port
    first = (
        f"POST http://plain.test:{port}/one HTTP/1.1\r\nHost: plain.test:{port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    answer = raw_request(env.gateway.proxy_port, first.encode(), source)
    assert answer.status == 200
    sock = answer.sock
    sock.sendall(f"GET http://plain.test:{port}/two HTTP/1.1\r\nHost: plain.test:{port}\r\n".encode())
    refused = b""
    try:
        for _ in range(64):  # at most 32 KB, well past the 8 KB limit; never a blank line
            sock.sendall(b"X-Trickle: " + b"a" * 500 + b"\r\n")
            time.sleep(0.005)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            refused += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    assert refused.startswith(b"HTTP/1.1 431"), refused[:200]
    env.decision(source, "headers_too_large")
    assert "/two" not in [r["path"] for r in env.plain.requests]
    env.assert_still_serves()


def test_tls_sent_to_the_proxy_port_itself_is_closed(env: Env) -> None:
    source = env.fresh_source()
    sock = socket.create_connection(("127.0.0.1", env.gateway.proxy_port), timeout=10, source_address=(source, 0))
    sock.sendall(bytes.fromhex("160301002e010000"))
    assert closed_by_peer(sock, timeout=10)
    sock.close()
    env.assert_still_serves()


def test_slowloris_request_head_is_cut_at_the_client_request_timeout(env: Env) -> None:
    source = env.fresh_source()
    sock = socket.create_connection(("127.0.0.1", env.gateway.proxy_port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.monotonic()
    closed_after = None
    for byte in b"CONNECT allowed.test:443 HTTP/1.1\r\nX-Slow: " + b"a" * 200:  # 0.25 s a byte: ~60 s if let be
        try:
            sock.sendall(bytes([byte]))
            time.sleep(0.25)
            sock.setblocking(False)
            try:
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - started
            break
    sock.close()
    assert closed_after is not None and closed_after < 3 + 3, closed_after  # client_request_s = 3, plus slack
    line = env.gateway.wait_for("client_request_timeout", lambda e: e.get("client") == source)
    assert line["received"] == "partial_http_request"
    assert 0 < line["received_bytes"] <= len(b"CONNECT allowed.test:443 HTTP/1.1\r\nX-Slow: ") + 200
    env.assert_still_serves()


def test_slowloris_on_a_kept_alive_connection_is_cut_too(env: Env) -> None:
    source = env.fresh_source()
    port = env.plain.port
    answer = raw_request(
        env.gateway.proxy_port,
        f"GET http://plain.test:{port}/one HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n".encode(),
        source,
    )
    assert answer.status == 200
    started = time.monotonic()
    answer.sock.sendall(b"GET http://plain.test")  # ...and nothing more
    assert closed_by_peer(answer.sock, timeout=10)
    assert time.monotonic() - started < 3 + 3
    answer.sock.close()
    env.assert_still_serves()
