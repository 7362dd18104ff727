"""The request-head reader: the common-CONNECT path answers only where every check accepts, with the Request
mitmproxy's parser builds; everything else gets exactly the full path's answer. Differential, over the hostile
cases of tests/hardening, CONNECT-shaped near misses, every prefix of each, and random heads (hypothesis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from egress_gateway.wire.heads import HeadLimits
from egress_gateway.wire.request_head import read_common_connect, read_head, read_head_in_full
from tests.hardening.test_hostile_requests import CASES, SMUGGLING

LIMITS = HeadLimits()
TIGHT = HeadLimits(max_request_line_bytes=40, max_header_bytes=120, max_headers=3)

# What clients send for a tunnel (curl, Go, Python's http.client/urllib3, Java, a client with credentials).
COMMON = [
    b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nUser-Agent: curl/8.5.0\r\n"
    b"Proxy-Connection: Keep-Alive\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nUser-Agent: Go-http-client/1.1\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.0\r\n\r\n",
    b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n",
    b"CONNECT repo.maven.apache.org:443 HTTP/1.1\r\nUser-Agent: Java/21\r\nHost: repo.maven.apache.org\r\n"
    b"Accept: text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2\r\nProxy-Connection: keep-alive\r\n\r\n",
    b"CONNECT s3.eu-west-1.amazonaws.com:8443 HTTP/1.1\r\nHost: s3.eu-west-1.amazonaws.com:8443\r\n"
    b"Proxy-Authorization: Bearer eyJhbGciOi.x.y\r\nConnection: keep-alive\r\n\r\n",
    b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nX-Tab:\tvalue\t\r\nX-Empty:\r\nX-Spaces:   a  b   \r\n\r\n",
]

# CONNECT heads one detail away from the common shape: each must get the full path's answer.
NEAR_MISSES = [
    b"CONNECT api.example.com:443 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: a.test:443\r\nhost: b.test:443\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nConnection: content-length\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nConnection: keep-alive, Host\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nX-A: 1\r\n b\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nX-A : 1\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nX-A: \x01\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nX-A: caf\xc3\xa9\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nX(A): 1\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\nHost: api.example.com\n\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com\n\r\n",
    b"\r\nCONNECT api.example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT API.Example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT xn--bcher-kva.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com.:443 HTTP/1.1\r\n\r\n",
    b"CONNECT .api.example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT api..example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT " + b"a" * 64 + b".test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT " + b"a" * 63 + b".test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT " + b".".join([b"a" * 63] * 4) + b":443 HTTP/1.1\r\n\r\n",
    b"CONNECT a_b.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT -a.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:0 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:00443 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:65535 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:65536 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.2\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/2.0\r\n\r\n",
    b"CONNECT api.example.com:443  HTTP/1.1\r\n\r\n",
    b"CONNECT  api.example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1 \r\n\r\n",
    b"CONNECT\tapi.example.com:443 HTTP/1.1\r\n\r\n",
    b"connect api.example.com:443 HTTP/1.1\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x00\x05hello",  # early tunnel bytes follow
    b"CONNECT api.example.com:443 HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nX-Big: " + b"a" * 33_000 + b"\r\n\r\n",
]


def same_request(a: http.Request, b: http.Request) -> bool:
    """Equal in everything mitmproxy's parser sets, except the arrival time."""
    x, y = a.data, b.data
    return (
        type(x.host) is type(y.host)
        and (x.host, x.port, x.method, x.scheme, x.authority, x.path, x.http_version)
        == (y.host, y.port, y.method, y.scheme, y.authority, y.path, y.http_version)
        and x.headers.fields == y.headers.fields
        and (x.content, x.trailers, x.timestamp_end) == (y.content, y.trailers, y.timestamp_end)
    )


def assert_same_answer(head: bytes, limits: HeadLimits) -> bool:
    """The fast path agrees with the full checks on `head`; True when it answered (rather than deferring)."""
    full = read_head_in_full(head, limits)
    fast = read_common_connect(head, limits)
    answer = read_head(head, limits)
    if fast is not None:
        assert isinstance(full, http.Request), (head, full)
        assert same_request(fast, full), head
        assert isinstance(answer, http.Request) and same_request(answer, fast)
        return True
    if isinstance(full, http.Request):
        assert isinstance(answer, http.Request) and same_request(answer, full), head
    else:
        assert answer == full, head
    return False


def hostile_heads() -> list[bytes]:
    heads = [request.replace(b"{p}", b"8080") for request, _, _ in CASES.values()]
    for case, smuggled in SMUGGLING.items():
        version = b"HTTP/1.0" if case == "te_on_http_1_0" else b"HTTP/1.1"
        heads.append(b"POST http://plain.test:8080/ " + version + b"\r\nHost: plain.test:8080\r\n" + smuggled)
        heads.append(b"CONNECT allowed.test:443 " + version + b"\r\nHost: allowed.test:443\r\n" + smuggled)
    return heads


@pytest.mark.parametrize("head", COMMON)
def test_the_common_connect_heads_take_the_fast_path_with_the_parsers_request(head: bytes) -> None:
    assert assert_same_answer(head, LIMITS)
    request = read_head(head, LIMITS)
    assert isinstance(request, http.Request) and request.method == "CONNECT"


@pytest.mark.parametrize("limits", [LIMITS, TIGHT], ids=["default", "tight"])
def test_hostile_heads_and_near_misses_get_the_full_paths_answer_at_every_length(limits: HeadLimits) -> None:
    for head in [*hostile_heads(), *NEAR_MISSES, *COMMON]:
        for end in range(len(head) + 1) if len(head) < 600 else (len(head) - 1, len(head)):
            assert_same_answer(head[:end], limits)


def test_no_hostile_case_takes_the_fast_path() -> None:
    for head in hostile_heads():
        assert read_common_connect(head, LIMITS) is None, head


_NAME = st.sampled_from(
    [b"Host", b"host", b"HOST", b"User-Agent", b"Proxy-Connection", b"Connection", b"Content-Length",
     b"Transfer-Encoding", b"Proxy-Authorization", b"X-A", b"x!#$%&'*+.^_`|~", b"", b"X A", b"X\tA", b"X(A)",
     b"X\x00", b" X", b"X:Y"]
)  # fmt: skip
_VALUE = st.binary(max_size=12) | st.sampled_from(
    [b"", b" ", b"\t", b"api.test:443", b"keep-alive", b"close, content-length", b"Host", b"0", b"5", b"chunked",
     b" v \t", b"a\rb", b"a\nb", b"\x7f", b"caf\xc3\xa9"]
)  # fmt: skip
_HOST = st.sampled_from(
    [b"api.example.com", b"a", b"a.b", b"API.test", b"xn--bcher-kva.test", b"a_b.test", b"-a.test", b"a.test.",
     b".a", b"a..b", b"1.2.3.4", b"[::1]", b"a" * 63 + b".t", b"a" * 64 + b".t", b"", b"a b", b"a:b"]
) | st.binary(max_size=10)  # fmt: skip
_PORT = st.sampled_from([b"443", b"1", b"0", b"00443", b"65535", b"65536", b"99999", b"", b"-1", b"44 3", b"x"])
_VERSION = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b""])
_EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])


@st.composite
def connect_heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"CONNECT", b"CONNECT", b"connect", b"GET", b"CONNECT "]))
    line = method + b" " + draw(_HOST) + b":" + draw(_PORT) + b" " + draw(_VERSION)
    eol = draw(_EOL)
    head = line + eol
    for _ in range(draw(st.integers(0, 5))):
        separator = draw(st.sampled_from([b": ", b":", b" : ", b":\t"]))
        head += draw(_NAME) + separator + draw(_VALUE) + draw(_EOL)
    head += draw(_EOL) + draw(st.sampled_from([b"", b"\x16\x03\x01", b"GET / HTTP/1.1\r\n\r\n"]))
    if draw(st.booleans()):  # one byte changed, inserted or removed
        at = draw(st.integers(0, len(head)))
        edit = draw(st.sampled_from(["flip", "insert", "delete"]))
        byte = bytes([draw(st.integers(0, 255))])
        if edit == "insert":
            head = head[:at] + byte + head[at:]
        elif at < len(head):
            head = head[:at] + (byte if edit == "flip" else b"") + head[at + 1 :]
    return head


_LIMITS = st.builds(
    HeadLimits,
    max_request_line_bytes=st.sampled_from([8192, 16, 24, 30, 40]),
    max_header_bytes=st.sampled_from([32768, 40, 60, 90]),
    max_headers=st.sampled_from([100, 0, 1, 2]),
)


@settings(max_examples=3000, deadline=None)
@given(connect_heads(), _LIMITS)
def test_random_connect_shaped_heads_get_the_full_paths_answer(head: bytes, limits: HeadLimits) -> None:
    assert_same_answer(head, limits)


def test_random_bytes_and_mutated_common_heads_get_the_full_paths_answer() -> None:
    rng = random.Random(13)
    answered = 0
    for _ in range(3000):
        head = bytearray(rng.choice(COMMON))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(head))
            if rng.random() < 0.5:
                head[at] = rng.randrange(256)
            else:
                head.insert(at, rng.choice(b" \t\r\n:.-0A\x00\x80"))
        answered += assert_same_answer(bytes(head), LIMITS)
    for _ in range(500):
        assert_same_answer(bytes(rng.randrange(256) for _ in range(rng.randrange(80))), LIMITS)
    assert answered > 100  # the mutations that keep the common shape still take the fast path
