"""The tunnel inspector, sans I/O: real TLS 1.3 handshakes (Python's ssl on memory BIOs, client and server) and
HTTP/1 streams fed through it in pieces; what it reports and what it releases (issue 12, classes 1, 2, 3, 8)."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

import pytest

from egress_gateway.policy.model import Protocol
from egress_gateway.wire.heads import HeadLimits
from egress_gateway.wire.inspection import HELLO_RETRY_REQUEST_RANDOM, Held, Inspection, TunnelInspector
from tests.support.tls import TestCA, handmade_client_hello


def inspector() -> TunnelInspector:
    return TunnelInspector(HeadLimits())


def feed(tunnel: TunnelInspector, data: bytes, size: int) -> Inspection:
    total = Inspection()
    for start in range(0, len(data), size):
        step = tunnel.client_data(data[start : start + size])
        total.release += step.release
        total.seen += step.seen
    return total


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(Path(tmp_path_factory.mktemp("inspection-ca")))


@pytest.mark.parametrize("size", [1, 7, 100000])
def test_real_tls13_handshake_is_inspected_until_the_server_hello_then_relayed_blindly(ca: TestCA, size: int) -> None:
    server_context = ca.issue("tls.example").server_context()
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = ca.client_context().wrap_bio(client_in, client_out, server_hostname="tls.example")
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    tunnel = inspector()
    seen = []
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        upstream = feed(tunnel, client_out.read(), size)
        seen += upstream.seen
        server_in.write(upstream.release)
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        answer = server_out.read()
        for start in range(0, len(answer), size):
            tunnel.server_data(answer[start : start + size])
        client_in.write(answer)
        if client.version() and server.version():
            break
    assert client.version() == "TLSv1.3"
    assert [s.hello.sni for s in seen if s.hello] == ["tls.example"]
    assert tunnel.done and tunnel.protocol is Protocol.TLS
    assert tunnel.client_data(b"\x17\x03\x03 opaque").release == b"\x17\x03\x03 opaque"


def _hello(sni: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _server_hello(random: bytes) -> bytes:
    body = b"\x03\x03" + random + b"\x00" + b"\x13\x01" + b"\x00" + b"\x00\x06\x00\x2b\x00\x02\x03\x04"
    message = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + len(message).to_bytes(2, "big") + message


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_every_client_hello_is_reported_until_a_server_hello_that_is_not_a_retry(size: int) -> None:
    tunnel = inspector()
    first = feed(tunnel, _hello("a.example"), size)
    assert [s.hello.sni for s in first.seen if s.hello] == ["a.example"]
    retry = _server_hello(HELLO_RETRY_REQUEST_RANDOM) + b"\x14\x03\x03\x00\x01\x01"
    for start in range(0, len(retry), size):  # the HelloRetryRequest, split anywhere
        tunnel.server_data(retry[start : start + size])
    assert tunnel.retries == 1 and not tunnel.done
    flight = b"\x14\x03\x03\x00\x01\x01" + _hello("b.example")
    second = feed(tunnel, flight, size)
    assert [s.hello.sni for s in second.seen if s.hello] == ["b.example"]  # reported: the addon compares the SNI
    assert second.release == flight
    for start in range(0, 200, size):
        tunnel.server_data(_server_hello(bytes(32))[start : start + size])
    assert tunnel.done


def test_hello_retry_request_records_between_and_early_data_are_passed_on() -> None:
    tunnel = inspector()
    early = b"\x17\x03\x03\x00\x05early"
    step = tunnel.client_data(_hello("a.example") + early)
    assert step.release.endswith(early) and len(step.seen) == 1


def test_a_third_client_hello_is_a_problem() -> None:
    tunnel = inspector()
    problems = feed(tunnel, _hello("a.example") * 3, 1000).seen
    assert problems[-1].problem is not None and "more than 2" in problems[-1].problem


def test_an_incomplete_client_hello_is_held_and_released_whole() -> None:
    tunnel = inspector()
    hello = _hello("a.example")
    assert tunnel.client_data(hello[:-1]).release == b""
    assert tunnel.client_data(hello[-1:]).release == hello


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello from the client
        b"\x16\x03\x01\x00\x04\x01\x00\x40\x00",  # announced over the size cap
        b"\x16\x03\x01\x00\x00",  # an empty record
    ],
)
def test_malformed_tls_is_a_problem(data: bytes) -> None:
    seen = inspector().client_data(data).seen
    assert seen and seen[0].problem is not None and seen[0].protocol is Protocol.TLS


def test_records_of_other_types_after_the_hello_are_problems_when_unknown() -> None:
    seen = inspector().client_data(_hello("a.example") + b"\x18\x03\x03\x00\x01\x00").seen
    assert seen[-1].problem is not None and "record type 24" in seen[-1].problem


@pytest.mark.parametrize("size", [1, 5, 10000])
def test_http_requests_are_reported_one_by_one_through_their_framing(size: int) -> None:
    stream = (
        b"POST /a HTTP/1.1\r\nHost: a.example\r\nContent-Length: 11\r\n\r\nHost: b.exa"
        b"POST /b HTTP/1.1\r\nHost: b.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nGET /\r\n0\r\nTrailer: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: c.example\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x00"
    )
    tunnel = inspector()
    step = feed(tunnel, stream, size)
    assert [(s.protocol, s.request.host_header if s.request else None) for s in step.seen] == [
        (Protocol.HTTP, "a.example"),
        (Protocol.HTTP, "b.example"),
        (Protocol.HTTP, "c.example"),
        (Protocol.TCP, None),  # after an upgrade the bytes are opaque
    ]
    assert step.release == stream and tunnel.done


@pytest.mark.parametrize(
    ("first", "protocol"),
    [
        (b"\x00\x01", Protocol.TCP),
        (b"SSH-2.0-OpenSSH\r\n", Protocol.TCP),
        (b"get / HTTP/1.1\r\n", Protocol.TCP),
        (b"PRI * HTTP/2.0\r\n\r\n", Protocol.TCP),
        (b"\x16", Protocol.TLS),
        (b"GET / HTTP/1.1\r\n", Protocol.HTTP),
    ],
)
def test_first_bytes_decide_the_protocol(first: bytes, protocol: Protocol) -> None:
    tunnel = inspector()
    tunnel.client_data(first)
    assert tunnel.protocol is protocol


def test_a_prefix_that_may_still_become_a_request_line_waits() -> None:
    tunnel = inspector()
    assert tunnel.client_data(b"GET /path").seen == [] and tunnel.protocol is None
    assert tunnel.client_data(b" HTTP/1.1\r\nHost: x\r\n\r\n").seen[0].request is not None


def test_a_chunk_size_line_without_end_is_a_problem() -> None:
    tunnel = inspector()
    step = tunnel.client_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 5000)
    assert step.seen[-1].problem is not None


@pytest.mark.parametrize("size", [1, 13, 100000])
def test_a_plain_http_stream_reports_every_head_and_the_bytes_of_an_oversized_one(size: int) -> None:
    """`http=True` (a plain-HTTP proxy connection): no sniffing; a kept-alive head after a chunked body is checked
    like the first, and a head over the limits comes with its bytes so far (the session answers 431 from them)."""
    first = b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    second = b"GET http://a.test/two HTTP/1.1\r\nHost: a.test\r\n" + b"X-Big: " + b"a" * 40000 + b"\r\n"
    plain = TunnelInspector(HeadLimits(), http=True)
    seen = feed(plain, first + second, size).seen
    assert [s.request.path for s in seen if s.request is not None] == ["/"]
    problems = [s for s in seen if s.problem is not None]
    assert len(problems) == 1 and problems[0].head is not None
    assert problems[0].head.startswith(b"GET http://a.test/two HTTP/1.1\r\n")


def test_a_plain_http_stream_of_garbage_is_a_problem_not_opaque_tcp() -> None:
    seen = TunnelInspector(HeadLimits(), http=True).client_data(b"\x00\x01garbage\r\n\r\n").seen
    assert [s.protocol for s in seen] == [Protocol.HTTP] and seen[0].problem is not None


@pytest.mark.parametrize(
    ("pieces", "http", "held", "shape"),
    [
        ([], False, 0, Held.NOTHING),
        ([b"\x16"], False, 1, Held.PARTIAL_TLS_CLIENT_HELLO),
        ([b"\x16\x03\x01\x00\x40", b"\x01\x00"], False, 7, Held.PARTIAL_TLS_CLIENT_HELLO),
        ([b"GET / HT"], False, 8, Held.PARTIAL_HTTP_REQUEST),  # may still become a request line
        ([b"GET / HTTP/1.1\r\nHost: a"], False, 23, Held.PARTIAL_HTTP_REQUEST),
        ([b"GET http://a/ HTTP/1.1\r\nHo"], True, 26, Held.PARTIAL_HTTP_REQUEST),
        (
            [b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", b"1"],
            True,
            1,
            Held.PARTIAL_CHUNK_LINE,
        ),
        ([b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"], True, 0, Held.NOTHING),  # a whole head is released
    ],
)
def test_what_the_inspector_holds_says_what_the_client_sent(
    pieces: list[bytes], http: bool, held: int, shape: Held
) -> None:
    inspector = TunnelInspector(HeadLimits(), http=http)
    for piece in pieces:
        inspector.client_data(piece)
    assert inspector.received == sum(len(p) for p in pieces)
    assert inspector.held == held
    assert inspector.held_shape() is shape


def test_a_whole_client_hello_is_not_held() -> None:
    inspector = TunnelInspector(HeadLimits())
    hello = handmade_client_hello("a.example")
    inspection = inspector.client_data(hello[:-1])
    assert inspector.held_shape() is Held.PARTIAL_TLS_CLIENT_HELLO and not inspection.seen
    inspection = inspector.client_data(hello[-1:])
    assert inspection.seen and inspector.held == 0 and inspector.held_shape() is Held.NOTHING
    assert inspector.received == len(hello)


@pytest.mark.parametrize("held", [b"", b"GET http://a.test/one HTTP/1.1\r\nHost: a"])
def test_a_request_head_says_where_it_starts_in_the_release_that_reports_it(held: bytes) -> None:
    """`Seen.at`: the session hands mitmproxy the bytes before a CONNECT and keeps the CONNECT and what follows."""
    first = b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello"
    plain = TunnelInspector(HeadLimits(), http=True)
    assert plain.client_data(first).release == first
    rest = b".test\r\n\r\n" if held else b""
    connect = b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test\r\n\r\n"
    assert plain.client_data(held).release == b""  # an incomplete head is held
    inspection = plain.client_data(rest + connect + b"\x16\x03\x01tls")
    heads = [s for s in inspection.seen if s.request is not None]
    assert [s.request.method for s in heads if s.request is not None] == (["GET", "CONNECT"] if held else ["CONNECT"])
    assert [inspection.release[s.at :].split(b" ", 1)[0] for s in heads] == [
        s.request.method.encode() for s in heads if s.request
    ]
    assert inspection.release[heads[-1].at :] == connect + b"\x16\x03\x01tls"
