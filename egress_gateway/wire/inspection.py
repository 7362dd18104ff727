"""What a tunnel carries, read until it can be relayed blindly: sans-I/O inspection of a tunnel's bytes.

Owns `TunnelInspector`, one per CONNECT tunnel. It classifies the tunnel's first client bytes (TLS by the handshake
layer, HTTP/1 by a complete request line, anything else opaque TCP) and reports, in stream order, everything the
addon must check before the bytes may go upstream (`Seen`):

- TLS: every ClientHello the client sends until the handshake turns encrypted. The client's cleartext records are
  read (ClientHello messages only; ChangeCipherSpec, alerts and early data are passed on) until the server's
  ServerHello that is not a HelloRetryRequest has been seen in the server's records: after it no ClientHello can
  be accepted by the server, and the client's next flight is encrypted (TLS 1.3) or holds no ClientHello (1.2).
- HTTP: every request head, following Content-Length and chunked framing; an upgraded connection (Upgrade,
  CONNECT inside the tunnel, HTTP/2 preface) is opaque from there on and reported as TCP.
- TCP: once.

`client_data` returns the bytes that may be forwarded now: bytes of a message still incomplete (a ClientHello,
a request head) are held until it is whole and reported. Each byte is examined once (linear work); a ClientHello
is capped by `clienthello.MAX_CLIENT_HELLO` and the records it may span. It decides nothing and does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.net.http.validate import validate_headers

from egress_gateway.policy.model import Protocol
from egress_gateway.wire.clienthello import (
    ALERT,
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    CLIENT_HELLO,
    HANDSHAKE,
    MAX_CLIENT_HELLO,
    MAX_CLIENT_HELLO_RECORDS,
    RECORD_HEADER,
    SERVER_HELLO,
    ClientHello,
    InvalidClientHello,
    parse_client_hello_message,
    record_length,
)
from egress_gateway.wire.heads import (
    HeadLimits,
    check_request_head,
    complete_head_lines,
    framing_problem,
    head_length,
    request_line_problem,
)

# RFC 8446 4.1.3: a HelloRetryRequest is a ServerHello with this random.
HELLO_RETRY_REQUEST_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
MAX_CLIENT_HELLOS = 2  # the first and the one answering a HelloRetryRequest (at most one per handshake)
MAX_CHUNK_LINE = 4096  # a chunk-size line or a trailer line
# A request line as clients send it (upper-case method). Anything else is opaque TCP, which no rule allows unless it
# says so; a lenient origin that would parse other spellings as HTTP is therefore only reachable where TCP is.
_METHOD = rb"[A-Z][A-Z_-]{0,31}"
_REQUEST_LINE = re.compile(rb"^" + _METHOD + rb" [\x21-\x7e]+ HTTP/1\.[0-9]\r?\n")
_REQUEST_LINE_START = re.compile(rb"^" + _METHOD + rb"(?: [\x21-\x7e]*(?: [\x21-\x7e]*\r?)?)?$")
_SERVER_HELLO_PREFIX = 4 + 2 + 32  # handshake header, legacy_version, random


@dataclass(frozen=True, slots=True)
class Seen:
    """One thing the addon must check before the bytes that carry it go upstream."""

    protocol: Protocol
    hello: ClientHello | None = None
    request: http.Request | None = None
    problem: str | None = None  # malformed or over-limit input: deny as a bad request
    head: bytes | None = None  # with a request-head problem: the head's bytes so far
    at: int = 0  # HTTP: where the request head starts in the `release` of the inspection that reports it


@dataclass(slots=True)
class Inspection:
    release: bytes = b""
    seen: list[Seen] = field(default_factory=list)


class Held(Enum):
    """What the client bytes an inspector holds look like (an incomplete message it waits for the rest of): what a
    timeout's record says the client sent."""

    NOTHING = "nothing"  # nothing held: no bytes, or only complete messages
    PARTIAL_TLS_CLIENT_HELLO = "partial_tls_client_hello"  # TLS records of a ClientHello that is not complete
    PARTIAL_HTTP_REQUEST = "partial_http_request"  # an HTTP/1 request line or head that is not complete
    PARTIAL_CHUNK_LINE = "partial_chunk_line"  # a chunk-size or trailer line of a chunked body, not complete

    @property
    def description(self) -> str:
        return _HELD_DESCRIPTIONS[self]


_HELD_DESCRIPTIONS = {
    Held.NOTHING: "no incomplete message",
    Held.PARTIAL_TLS_CLIENT_HELLO: "a TLS ClientHello that is not complete",
    Held.PARTIAL_HTTP_REQUEST: "an HTTP request head that is not complete",
    Held.PARTIAL_CHUNK_LINE: "a chunk-size line of a chunked body that is not complete",
}


class _Mode(Enum):
    SNIFF = "sniff"
    TLS = "tls"
    HTTP = "http"
    DONE = "done"  # relay blindly (encrypted TLS, opaque TCP, an upgraded HTTP connection, or after a problem)


class _Body(Enum):
    HEAD = "head"
    LENGTH = "length"
    CHUNK_SIZE = "chunk_size"
    CHUNK_DATA = "chunk_data"
    CHUNK_END = "chunk_end"  # the CRLF after a chunk's data
    TRAILERS = "trailers"


class TunnelInspector:
    def __init__(self, head_limits: HeadLimits, *, http: bool = False) -> None:
        """`http`: the stream is known to be HTTP/1 requests (a plain-HTTP proxy connection), no sniffing."""
        self.head_limits = head_limits
        self.received = 0  # client bytes read so far
        self.protocol: Protocol | None = Protocol.HTTP if http else None
        self._mode = _Mode.HTTP if http else _Mode.SNIFF
        self._pending = bytearray()  # client bytes not released yet
        self._scan = 0  # offset in `_pending` up to which the bytes were examined
        # TLS, client side
        self._handshake = bytearray()  # client handshake bytes of a message not complete yet
        self._hello_records = 0
        self.hellos = 0
        # TLS, server side
        self.retries = 0  # HelloRetryRequests seen
        self._server_header = bytearray()
        self._server_record_left = 0
        self._server_record_is_handshake = False
        self._server_message = bytearray()
        self._server_message_left = 0
        self._server_opaque = False  # the server left cleartext handshake without a ServerHello: stop reading it
        # HTTP
        self._body = _Body.HEAD
        self._body_left = 0

    @property
    def done(self) -> bool:
        """Nothing more to inspect and nothing held: the caller may relay both directions without the inspector."""
        return self._mode is _Mode.DONE and not self._pending

    @property
    def held(self) -> int:
        """Client bytes held: those of a message not complete yet."""
        return len(self._pending)

    def held_shape(self) -> Held:
        """What the bytes held look like (`Held`)."""
        if not self._pending:
            return Held.NOTHING
        if self._mode is _Mode.TLS:
            return Held.PARTIAL_TLS_CLIENT_HELLO
        if self._mode is _Mode.HTTP and self._body is not _Body.HEAD:
            return Held.PARTIAL_CHUNK_LINE
        return Held.PARTIAL_HTTP_REQUEST  # an HTTP head, or a start that may still become a request line (SNIFF)

    # ---- client -> server -----------------------------------------------------------------------------------
    def client_data(self, data: bytes) -> Inspection:
        self.received += len(data)
        if self._mode is _Mode.DONE:
            return self._release_all(data)
        self._pending += data
        out = Inspection()
        if self._mode is _Mode.SNIFF:
            self._sniff(out)
        if self._mode is _Mode.TLS:
            self._client_records(out)
        elif self._mode is _Mode.HTTP:
            self._requests(out)
        if self._mode is _Mode.DONE:
            out.release = bytes(self._pending)
            self._pending.clear()
            self._scan = 0
            return out
        return out

    def _release_all(self, data: bytes) -> Inspection:
        if self._pending:
            data = bytes(self._pending) + data
            self._pending.clear()
            self._scan = 0
        return Inspection(release=data)

    def _release_to(self, out: Inspection, end: int) -> None:
        if end > 0:
            out.release += bytes(self._pending[:end])
            del self._pending[:end]
            self._scan -= end

    def _problem(self, out: Inspection, protocol: Protocol, message: str, head: bytes | None = None) -> None:
        out.seen.append(Seen(protocol, problem=message, head=head))
        self._mode = _Mode.DONE  # the addon closes the tunnel; nothing after this is read

    def _sniff(self, out: Inspection) -> None:
        data = self._pending
        if not data:
            return
        if data[0] == HANDSHAKE:
            self._mode, self.protocol = _Mode.TLS, Protocol.TLS
            return
        line_end = data.find(b"\n", 0, self.head_limits.max_request_line_bytes + 2)
        if line_end >= 0:
            is_http = _REQUEST_LINE.match(data[: line_end + 1]) is not None
        elif len(data) <= self.head_limits.max_request_line_bytes and _REQUEST_LINE_START.match(data):
            return  # may still become a request line
        else:
            is_http = False
        if is_http:
            self._mode, self.protocol = _Mode.HTTP, Protocol.HTTP
        else:
            self.protocol = Protocol.TCP
            out.seen.append(Seen(Protocol.TCP))
            self._mode = _Mode.DONE

    # ---- TLS ------------------------------------------------------------------------------------------------
    def _client_records(self, out: Inspection) -> None:
        data = self._pending
        pos = self._scan
        released = 0
        while self._mode is _Mode.TLS and len(data) - pos >= RECORD_HEADER:
            content_type = data[pos]
            # Judged by its header, before its payload arrives (as `parse_client_hello` does).
            problem: str | None = None
            if content_type not in (HANDSHAKE, CHANGE_CIPHER_SPEC, ALERT, APPLICATION_DATA):
                problem = f"unexpected TLS record type {content_type} before the handshake is encrypted"
            elif content_type != HANDSHAKE and self._handshake:
                problem = "a ClientHello is interleaved with another record"
            else:
                try:
                    length = record_length(data, pos)
                except InvalidClientHello as exc:
                    problem = str(exc)
            if problem is not None:
                self._problem(out, Protocol.TLS, f"malformed TLS ClientHello: {problem}")
                return
            end = pos + RECORD_HEADER + length
            if end > len(data):
                break
            if content_type == HANDSHAKE:
                problem = self._client_handshake(data, pos + RECORD_HEADER, end, out)
            if problem is not None:
                self._problem(out, Protocol.TLS, f"malformed TLS ClientHello: {problem}")
                return
            pos = end
            if not self._handshake:
                released = pos
        self._scan = pos
        self._release_to(out, released)

    def _client_handshake(self, data: bytearray, start: int, end: int, out: Inspection) -> str | None:
        """One handshake record: gather it; report the ClientHello it completes. Same limits and order of checks as
        `parse_client_hello`, which is the reference this is tested and fuzzed against."""
        handshake = self._handshake
        handshake += data[start:end]
        self._hello_records += 1
        if handshake[0] != CLIENT_HELLO:
            return f"client handshake message of type {handshake[0]} before the handshake is encrypted"
        if self._hello_records > MAX_CLIENT_HELLO_RECORDS:
            return f"ClientHello spans more than {MAX_CLIENT_HELLO_RECORDS} records"
        if len(handshake) < 4:
            return None
        needed = 4 + int.from_bytes(handshake[1:4], "big")
        if needed > MAX_CLIENT_HELLO:
            return f"ClientHello of {needed} bytes exceeds {MAX_CLIENT_HELLO}"
        if len(handshake) < needed:
            return None
        if len(handshake) > needed:
            return "more handshake data follows the ClientHello in its record"
        self.hellos += 1
        if self.hellos > MAX_CLIENT_HELLOS:
            return f"more than {MAX_CLIENT_HELLOS} ClientHellos in one handshake"
        try:
            hello = parse_client_hello_message(bytes(handshake))
        except InvalidClientHello as exc:
            return str(exc)
        out.seen.append(Seen(Protocol.TLS, hello=hello))
        handshake.clear()
        self._hello_records = 0
        return None

    # ---- server -> client -----------------------------------------------------------------------------------
    def server_data(self, data: bytes) -> None:
        """Watch the server's records for the ServerHello (the handshake turns encrypted after it) and count
        HelloRetryRequests. Only a few header bytes are kept; the data itself is relayed by the caller."""
        if self._mode is not _Mode.TLS or self._server_opaque:
            return
        pos = 0
        while pos < len(data) and self._mode is _Mode.TLS and not self._server_opaque:
            if self._server_record_left == 0:
                take = RECORD_HEADER - len(self._server_header)
                self._server_header += data[pos : pos + take]
                pos += take
                if len(self._server_header) < RECORD_HEADER:
                    return
                header, self._server_header = self._server_header, bytearray()
                length = int.from_bytes(header[3:5], "big")
                if header[0] not in (HANDSHAKE, CHANGE_CIPHER_SPEC) or length == 0:
                    self._server_opaque = True  # an alert or no TLS at all: no ServerHello will come
                    return
                self._server_record_left = length
                self._server_record_is_handshake = header[0] == HANDSHAKE
                continue
            take = min(self._server_record_left, len(data) - pos)
            chunk = data[pos : pos + take]
            pos += take
            self._server_record_left -= take
            if self._server_record_is_handshake:
                self._server_handshake(chunk)

    def _server_handshake(self, chunk: bytes) -> None:
        index = 0
        while index < len(chunk) and self._mode is _Mode.TLS and not self._server_opaque:
            if self._server_message_left:
                skip = min(self._server_message_left, len(chunk) - index)
                self._server_message_left -= skip
                index += skip
                continue
            take = _SERVER_HELLO_PREFIX - len(self._server_message)
            self._server_message += chunk[index : index + take]
            index += take
            message = self._server_message
            if message[0] != SERVER_HELLO:
                self._server_opaque = True
                return
            if len(message) < _SERVER_HELLO_PREFIX:
                return
            length = int.from_bytes(message[1:4], "big")
            if length < _SERVER_HELLO_PREFIX - 4:
                self._server_opaque = True
                return
            if message[6:38] != HELLO_RETRY_REQUEST_RANDOM:
                self._mode = _Mode.DONE  # the real ServerHello: no ClientHello can follow in cleartext
                return
            self.retries += 1
            self._server_message = bytearray()
            self._server_message_left = length - (_SERVER_HELLO_PREFIX - 4)

    # ---- HTTP -----------------------------------------------------------------------------------------------
    def _requests(self, out: Inspection) -> None:
        while self._mode is _Mode.HTTP:
            if self._body is _Body.HEAD:
                if not self._request_head(out):
                    break
            elif not self._body_bytes(out):
                break
        if self._mode is _Mode.HTTP:
            self._release_to(out, self._scan)  # an incomplete head starts at `_scan`: it is held

    def _request_head(self, out: Inspection) -> bool:
        data = bytes(self._pending[self._scan :])
        if not data:
            return False
        problem = check_request_head(data, self.head_limits)
        if problem is not None:
            self._problem(out, Protocol.HTTP, f"malformed HTTP request in the tunnel: {problem.message}", data)
            return False
        malformed = request_line_problem(data)
        lines = complete_head_lines(data)
        if malformed is None and lines is None:
            return False
        if malformed is None and lines is not None:
            malformed = framing_problem(lines)
        request: http.Request | None = None
        if malformed is None and lines is not None:
            try:
                request = http1.read_request_head(lines)
                validate_headers(request)
                size = http1.expected_http_body_size(request)
            except ValueError as exc:
                malformed = str(exc)
        if malformed is not None or request is None:
            self._problem(out, Protocol.HTTP, f"malformed HTTP request in the tunnel: {malformed}", data)
            return False
        at = self._scan
        self._scan += head_length(data) or len(data)
        if (
            request.http_version not in ("HTTP/1.0", "HTTP/1.1")
            or request.method == "CONNECT"
            or ("upgrade" in request.headers)
        ):
            # HTTP/2 prior knowledge, a tunnel in the tunnel, an upgrade: what follows is opaque to the gateway.
            out.seen.append(Seen(Protocol.HTTP, request=request, at=at))
            out.seen.append(Seen(Protocol.TCP))
            self._mode = _Mode.DONE
            return False
        out.seen.append(Seen(Protocol.HTTP, request=request, at=at))
        if size is None:
            self._body = _Body.CHUNK_SIZE
        elif size > 0:
            self._body, self._body_left = _Body.LENGTH, size
        return True

    def _line(self, out: Inspection) -> bytes | None:
        end = self._pending.find(b"\n", self._scan)
        if end < 0:
            if len(self._pending) - self._scan > MAX_CHUNK_LINE:
                self._problem(out, Protocol.HTTP, "malformed HTTP request in the tunnel: chunked framing line too long")
            return None
        line = bytes(self._pending[self._scan : end]).rstrip(b"\r")
        self._scan = end + 1
        return line

    def _body_bytes(self, out: Inspection) -> bool:
        """Skip body bytes as they arrive (they are released at once); True when a step completed."""
        available = len(self._pending) - self._scan
        if self._body in (_Body.LENGTH, _Body.CHUNK_DATA):
            if available == 0:
                return False
            take = min(self._body_left, available)
            self._scan += take
            self._body_left -= take
            if self._body_left == 0:
                self._body = _Body.HEAD if self._body is _Body.LENGTH else _Body.CHUNK_END
            return True
        line = self._line(out)
        if line is None:
            return False
        if self._body is _Body.CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            try:
                if not size_text or len(size_text) > 16:
                    raise ValueError
                size = int(size_text, 16)
            except ValueError:
                self._problem(out, Protocol.HTTP, f"malformed HTTP request in the tunnel: chunk size {line[:40]!r}")
                return False
            if size == 0:
                self._body = _Body.TRAILERS
            else:
                self._body, self._body_left = _Body.CHUNK_DATA, size
        elif self._body is _Body.CHUNK_END:
            if line:
                self._problem(out, Protocol.HTTP, "malformed HTTP request in the tunnel: chunk without CRLF")
                return False
            self._body = _Body.CHUNK_SIZE
        elif not line:  # the blank line after the trailers
            self._body = _Body.HEAD
        return True
