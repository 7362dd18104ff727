"""Unit tests of `egress_gateway.proxy.limits`: connection accounting, token buckets per namespace, head limits."""

from __future__ import annotations

import pytest

from egress_gateway.proxy.limits import ConnectionLimit, NamespaceRateLimiter
from egress_gateway.ratelimit import TokenBucket
from egress_gateway.wire.heads import (
    HeadLimits,
    HeadViolation,
    check_request_head,
    complete_head_lines,
    framing_problem,
    request_line_problem,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- connection limit ----------------------------------------------------------------------------------------------


def test_connection_limit_refuses_beyond_maximum_and_frees_on_release() -> None:
    limit = ConnectionLimit(2)
    assert limit.admit("a") and limit.admit("b")
    assert not limit.admit("c")
    assert limit.open == 2
    limit.release("a")
    assert limit.admit("c")
    assert limit.open == 2


def test_connection_limit_is_idempotent_per_id() -> None:
    limit = ConnectionLimit(1)
    assert limit.admit("a") and limit.admit("a")
    limit.release("a")
    limit.release("a")
    assert limit.open == 0


def test_connection_limit_rejects_nonsense_maximum() -> None:
    with pytest.raises(ValueError):
        ConnectionLimit(0)


# ---- token bucket --------------------------------------------------------------------------------------------------


def test_bucket_allows_burst_then_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 100
    assert bucket.full
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]  # never more than the burst
    assert bucket.take() > 0


def test_bucket_ignores_a_clock_stepping_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.take() == 0.0
    clock.now -= 50
    assert bucket.take() == pytest.approx(1.0)


def test_refused_takes_do_not_consume() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    bucket.take()
    for _ in range(10):
        assert bucket.take() > 0
    clock.now += 1.0
    assert bucket.take() == 0.0


# ---- per-namespace limiter ------------------------------------------------------------------------------------------


def test_namespaces_have_separate_buckets() -> None:
    clock = FakeClock()
    limiter = NamespaceRateLimiter(per_second=1.0, burst=2, clock=clock)
    assert limiter.acquire("shop").allowed and limiter.acquire("shop").allowed
    refused = limiter.acquire("shop")
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(1.0)
    assert refused.retry_after_header == "1"
    assert limiter.acquire("analytics").allowed  # another namespace is unaffected


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    clock = FakeClock()
    limiter = NamespaceRateLimiter(per_second=0.4, burst=1, clock=clock)
    limiter.acquire("shop")
    refused = limiter.acquire("shop")
    assert refused.retry_after_s == pytest.approx(2.5)
    assert refused.retry_after_header == "3"


def test_zero_rate_disables_the_limit() -> None:
    limiter = NamespaceRateLimiter(per_second=0.0, burst=1)
    assert not limiter.enabled
    assert all(limiter.acquire("shop").allowed for _ in range(1000))
    assert len(limiter) == 0


def test_idle_full_buckets_are_dropped_and_the_count_is_bounded() -> None:
    clock = FakeClock()
    limiter = NamespaceRateLimiter(per_second=10.0, burst=1, clock=clock, max_namespaces=3)
    for index in range(50):
        limiter.acquire(f"ns{index}")
    assert len(limiter) <= 3
    clock.now += 10  # every bucket refilled: they are all indistinguishable from new ones
    limiter.acquire("fresh")
    assert len(limiter) == 1


def test_eviction_keeps_the_most_recent_namespace_limited() -> None:
    clock = FakeClock()
    limiter = NamespaceRateLimiter(per_second=0.001, burst=1, clock=clock, max_namespaces=2)
    limiter.acquire("noisy")
    assert not limiter.acquire("noisy").allowed
    limiter.acquire("other")
    assert not limiter.acquire("noisy").allowed  # "noisy" was used last, "other" goes first


# ---- request head ---------------------------------------------------------------------------------------------------

LIMITS = HeadLimits(max_request_line_bytes=64, max_header_bytes=256, max_headers=4)


def test_a_normal_head_passes_complete_and_partial() -> None:
    head = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nAccept: */*\r\n\r\nbody"
    for cut in range(len(head) + 1):
        assert check_request_head(head[:cut], LIMITS) is None


def test_long_request_line_is_414_even_before_it_ends() -> None:
    problem = check_request_head(b"GET http://" + b"a" * 100, LIMITS)
    assert problem is not None
    assert problem.violation is HeadViolation.REQUEST_LINE_TOO_LONG
    assert problem.status == 414


def test_large_head_is_431() -> None:
    head = b"GET / HTTP/1.1\r\nX: " + b"v" * 300
    problem = check_request_head(head, LIMITS)
    assert problem is not None and problem.violation is HeadViolation.HEADERS_TOO_LARGE and problem.status == 431


def test_too_many_headers_is_431() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: 1\r\n" % i for i in range(5)) + b"\r\n"
    problem = check_request_head(head, LIMITS)
    assert problem is not None and problem.violation is HeadViolation.TOO_MANY_HEADERS
    assert (
        check_request_head(b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: 1\r\n" % i for i in range(4)) + b"\r\n", LIMITS)
        is None
    )


def test_bytes_after_the_head_are_not_counted() -> None:
    head = b"POST http://a.test/ HTTP/1.1\r\nContent-Length: 999\r\n\r\n" + b"x\r\n" * 500
    assert check_request_head(head, LIMITS) is None


def test_bare_lf_line_ends_and_leading_empty_lines() -> None:
    assert check_request_head(b"\r\n\r\nGET / HTTP/1.1\nHost: a\n\n", LIMITS) is None
    many = b"GET / HTTP/1.1\n" + b"".join(b"H%d: 1\n" % i for i in range(5)) + b"\n"
    problem = check_request_head(many, LIMITS)
    assert problem is not None and problem.violation is HeadViolation.TOO_MANY_HEADERS


# ---- framing --------------------------------------------------------------------------------------------------------


def test_complete_head_lines_waits_for_the_blank_line() -> None:
    assert complete_head_lines(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert complete_head_lines(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nrest") == [b"GET / HTTP/1.1", b"Host: a"]
    assert complete_head_lines(b"GET / HTTP/1.1\nHost: a\n\n") == [b"GET / HTTP/1.1", b"Host: a"]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([b"GET / HTTP/1.1", b"Host: a", b"Host: b"], "more than one Host header"),
        ([b"GET / HTTP/1.1", b"Host: a", b"host: a"], "more than one Host header"),
        ([b"GET / HTTP/1.1", b"Host: a\x00.evil"], "control character"),
        ([b"GET / HTTP/1.1", b"Host: a\rX-Injected: 1"], "control character"),
        ([b"GET / HTTP/1.1", b"Transfer-Encoding:", b" chunked"], "obs-fold"),
        ([b"GET / HTTP/1.1", b"Transfer-Encoding : chunked"], "malformed header line"),
        ([b"GET / HTTP/1.1", b"no colon here"], "malformed header line"),
        ([b"GET / HTTP/1.1", b": empty name"], "malformed header line"),
    ],
)
def test_ambiguous_heads_are_refused(lines: list[bytes], problem: str) -> None:
    found = framing_problem(lines)
    assert found is not None and problem in found


def test_ordinary_heads_pass_framing() -> None:
    assert framing_problem([b"GET http://a.test/ HTTP/1.1", b"Host: a.test", b"User-Agent: x\ty"]) is None
    assert (
        framing_problem([b"CONNECT a.test:443 HTTP/1.1", b"Host: a.test:443", b"Proxy-Authorization: Basic x"]) is None
    )


@pytest.mark.parametrize(
    "start", [b"\x80\x2e\x01\x03\x01", b"\x00\x01", "GET http://bücher.test/".encode(), b"GET /\x7f", b"GE\tT"]
)
def test_binary_request_lines_are_refused_before_the_line_ends(start: bytes) -> None:
    assert request_line_problem(start) is not None


def test_printable_request_lines_pass_even_when_partial() -> None:
    assert request_line_problem(b"\r\nCONNECT allowed.test:443 HTTP/1.1\r\nHost: \x01") is None
    assert request_line_problem(b"GET http://a.test/") is None
