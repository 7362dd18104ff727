"""A request head as the proxy receives it, checked in full before anything is decided. Sans-I/O: bytes in, a
mitmproxy `Request` or the reason to refuse out.

Owns `read_head` (what `GatewayAddon.read_head` answers with) and its two paths:

- `read_head_in_full`: every check, in order: the size limits and the printable request line on partial input
  (`heads.py`), then on the complete head the framing shapes mitmproxy tolerates (`heads.framing_problem`),
  mitmproxy's own HTTP/1 parser (`http1.read_request_head`), its header validation (`validate_headers`,
  `expected_http_body_size`) and the request forms a proxy serves (`request_form_problem`);
- `read_common_connect`: the head nearly every client sends for a tunnel (`CONNECT name:port HTTP/1.x`, a few
  ordinary header lines, CRLF line ends), recognised in one pass. It answers only for heads that every check above
  accepts, with the `Request` mitmproxy's parser builds from them, and None for anything else, which then takes the
  full path: it never refuses anything itself, so refusals and their messages come from one place.
  tests/wire/test_request_head.py checks both claims differentially (the hostile cases and random heads).

Imports mitmproxy's HTTP/1 reader and request model; no sockets, no engine.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.net.http.validate import validate_headers

from egress_gateway.wire.heads import (
    HeadLimits,
    HeadProblem,
    check_request_head,
    complete_head_lines,
    framing_header_named,
    framing_problem,
    request_line_problem,
)

# CONNECT, a lower-case DNS name and a port without leading zeros, HTTP/1.0 or 1.1; then header lines whose names
# are RFC 9110 tokens and whose values are visible ASCII, spaces and tabs; then the blank line. Everything else
# (upper case or IDNA names, IP literals, obs-text, bare LF, leading empty lines) takes the full path.
_COMMON_CONNECT = re.compile(
    rb"CONNECT ([a-z0-9.-]{1,253}):([1-9][0-9]{0,4}) (HTTP/1\.[01])\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)
# Names that change how a message is framed or routed: a head carrying one is left to the full checks.
_LEFT_TO_FULL_CHECKS = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Malformed:
    """A head that is not a request the proxy can serve (400 bad_request); `message` says why."""

    message: str


def read_head(head: bytes, limits: HeadLimits) -> http.Request | HeadProblem | Malformed | None:
    """A request head as received so far: the `Request` (complete and valid), why it is refused, or None: acceptable
    so far, wait for the rest."""
    request = read_common_connect(head, limits)
    if request is not None:
        return request
    return read_head_in_full(head, limits)


def read_head_in_full(head: bytes, limits: HeadLimits) -> http.Request | HeadProblem | Malformed | None:
    """`read_head` by every check in turn, for any head (the reference the common-CONNECT path is tested against)."""
    problem = check_request_head(head, limits)
    if problem is not None:
        return problem
    malformed = request_line_problem(head)
    lines = complete_head_lines(head)
    if malformed is None and lines is None:
        return None
    request: http.Request | None = None
    if malformed is None and lines is not None:
        malformed = framing_problem(lines)
    if malformed is None and lines is not None:
        try:  # the checks mitmproxy applies only after a requestheaders hook has already run
            request = http1.read_request_head(lines)
            validate_headers(request)
            http1.expected_http_body_size(request)
        except ValueError as exc:
            malformed = str(exc)
        else:
            malformed = request_form_problem(request)
    if malformed is None and request is not None:
        return request
    return Malformed(f"malformed request: {malformed}")


def read_common_connect(head: bytes, limits: HeadLimits) -> http.Request | None:
    """The `Request` of a complete CONNECT head of the common shape that passes every check, else None."""
    match = _COMMON_CONNECT.match(head)
    if match is None:
        return None
    host, port_text, version, block = match.groups()
    if (
        match.end() > limits.max_header_bytes
        or match.start(4) - 2 > limits.max_request_line_bytes
        or int(port_text) > 65535
    ):
        return None
    for label in host.split(b"."):
        if not label or len(label) > 63 or label.startswith(b"xn--"):  # empty, too long, or IDNA (decoded by mitmproxy)
            return None
    fields: list[tuple[bytes, bytes]] = []
    hosts = 0
    if block:
        lines = block.split(b"\r\n")
        lines.pop()  # after the last line end
        if len(lines) > limits.max_headers:
            return None
        for line in lines:
            name, _, value = line.partition(b":")
            lowered = name.lower()
            if lowered == b"host":
                hosts += 1
            elif lowered in _LEFT_TO_FULL_CHECKS or (lowered == b"connection" and framing_header_named(value)):
                return None
            fields.append((name, value.strip()))
    if hosts > 1:
        return None
    port = int(port_text)
    return http.Request(
        host=host.decode("ascii"),
        port=port,
        method=b"CONNECT",
        scheme=b"",
        authority=head[8 : match.end(2)],
        path=b"",
        http_version=version,
        headers=http.Headers(fields),
        content=None,
        trailers=None,
        timestamp_start=time.time(),
        timestamp_end=None,
    )


def request_form_problem(request: http.Request) -> str | None:
    """Why a parsed request is not one a forward proxy serves (HTTP/1.x, CONNECT or an absolute URL), or None."""
    if request.http_version not in ("HTTP/1.0", "HTTP/1.1"):
        return f"{request.http_version} is not spoken here (HTTP/2 prior knowledge included); use HTTP/1.1"
    if request.method != "CONNECT" and not request.scheme:
        return "a proxy request must use CONNECT or an absolute URL (http://host/path)"
    return None
