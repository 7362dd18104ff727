"""HTTP/1 request heads as received: size limits on partial input, where a head ends, and the framing shapes
(RFC 9112) that make a request ambiguous to forward. Sans-I/O: bytes in, a verdict out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

_BLANK_LINE = re.compile(rb"\n\r?\n")
_CONTROL_CHARACTER = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # C0 controls except HTAB, and DEL
# Headers that say where a message ends or where it goes: never hop-by-hop, never removed or rewritten on the way.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host"})


class HeadViolation(StrEnum):
    REQUEST_LINE_TOO_LONG = "request_line_too_long"  # 414
    HEADERS_TOO_LARGE = "headers_too_large"  # 431
    TOO_MANY_HEADERS = "too_many_headers"  # 431


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 32768  # the whole head: request line, headers and line ends
    max_headers: int = 100


@dataclass(frozen=True, slots=True)
class HeadProblem:
    violation: HeadViolation
    message: str

    @property
    def status(self) -> int:
        return 414 if self.violation is HeadViolation.REQUEST_LINE_TOO_LONG else 431


def check_request_head(buffer: bytes | bytearray, limits: HeadLimits) -> HeadProblem | None:
    """Check a request head as received so far (complete or not); None while it is within the limits.

    Only the bytes up to the first blank line are the head; anything after it is the body or the next request.
    Works on partial input so a client that never ends its head is refused as soon as it crosses a limit.
    """
    data = bytes(buffer)
    start = 0
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line received before the request line.
    while data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        start += 2 if data.startswith(b"\r\n", start) else 1
    end = _head_end(data, start)
    head = data[start:end] if end is not None else data[start:]
    line_end = head.find(b"\n")
    request_line = head if line_end < 0 else head[:line_end]
    if len(request_line.rstrip(b"\r")) > limits.max_request_line_bytes:
        return HeadProblem(
            HeadViolation.REQUEST_LINE_TOO_LONG,
            f"the request line exceeds {limits.max_request_line_bytes} bytes",
        )
    if len(head) > limits.max_header_bytes:
        return HeadProblem(HeadViolation.HEADERS_TOO_LARGE, f"the request head exceeds {limits.max_header_bytes} bytes")
    if line_end >= 0:
        fields = sum(1 for line in head[line_end + 1 :].split(b"\n") if line.strip(b"\r"))
        if fields > limits.max_headers:
            return HeadProblem(
                HeadViolation.TOO_MANY_HEADERS, f"the request has more than {limits.max_headers} headers"
            )
    return None


def _head_end(data: bytes, start: int) -> int | None:
    """Index of the line end before the blank line that ends the head, or None if not received yet.

    Same rule as mitmproxy's parser (h11's receive buffer): a blank line is `\n\n` or `\n\r\n`.
    """
    match = _BLANK_LINE.search(data, start)
    return match.start() if match is not None else None


def request_line_problem(buffer: bytes | bytearray) -> str | None:
    """A request line (complete or not) may hold only visible ASCII and spaces; refuse binary at the first byte.

    Catches binary protocols (an SSLv2-style hello, random bytes) before the client can make us wait for a line end.
    """
    data = bytes(buffer[:8192]).lstrip(b"\r\n")
    line = data.split(b"\n", 1)[0]
    if line.endswith(b"\r"):
        line = line[:-1]
    if any(byte < 0x20 or byte > 0x7E for byte in line):
        return "the request line is not printable ASCII"
    return None


def head_length(buffer: bytes | bytearray) -> int | None:
    """How many bytes the complete request head takes (leading empty lines and its blank line included), or None
    while its blank line has not arrived. What follows is the body, the next request or a tunnel's first bytes."""
    data = bytes(buffer)
    start = 0
    while data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        start += 2 if data.startswith(b"\r\n", start) else 1
    match = _BLANK_LINE.search(data, start)
    return match.end() if match is not None else None


def complete_head_lines(buffer: bytes | bytearray) -> list[bytes] | None:
    """The lines of the request head (request line first, line ends removed) once its blank line arrived; else None."""
    data = bytes(buffer)
    start = 0
    while data.startswith(b"\r\n", start) or data.startswith(b"\n", start):
        start += 2 if data.startswith(b"\r\n", start) else 1
    end = _head_end(data, start)
    if end is None:
        return None
    return [line[:-1] if line.endswith(b"\r") else line for line in data[start:end].split(b"\n")]


def framing_header_named(value: bytes) -> str | None:
    """The first framing header a Connection header value names (a comma-separated list), or None."""
    for token in value.split(b","):
        name = token.strip(b" \t").lower().decode("latin-1")
        if name in FRAMING_HEADERS:
            return name
    return None


def framing_problem(lines: list[bytes]) -> str | None:
    """What makes a complete request head ambiguous to forward (RFC 9112), or None.

    These are the request-smuggling and header-injection shapes that mitmproxy's own parser tolerates: folded
    header lines, whitespace between a field name and its colon, control characters (NUL, bare CR) in a line, and
    more than one Host header, and a Connection header naming a framing header (`Connection: content-length`
    would make a proxy that strips hop-by-hop headers remove the header that fixed the body length, so the origin
    would read the body as a second request). Framing headers (Content-Length/Transfer-Encoding) are checked by
    mitmproxy's `validate_headers`, which the proxy runs as well.
    """
    if not lines:
        return "empty request head"
    hosts = 0
    for index, line in enumerate(lines):
        if _CONTROL_CHARACTER.search(line):
            return "control character in the request head"
        if index == 0:
            continue
        if line[:1] in (b" ", b"\t"):
            return "folded header line (obs-fold)"
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip(b" \t"):
            return f"malformed header line {line[:64]!r}"
        lowered = name.lower()
        if lowered == b"host":
            hosts += 1
        elif lowered == b"connection":
            named = framing_header_named(line[len(name) + 1 :])
            if named is not None:
                return f"the Connection header names {named}, which can never be hop-by-hop"
    if hosts > 1:
        return "more than one Host header"
    return None
