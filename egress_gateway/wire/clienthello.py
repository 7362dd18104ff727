"""TLS ClientHello parsing, sans I/O: the first bytes of a tunnel in, the SNI (and ALPN) out.

Owns: `starts_like_tls`, `parse_client_hello_message` (one complete handshake message), the caps, and
`parse_client_hello` (one shot, over a buffer: the reference that the incremental reader of a tunnel,
`wire/inspection.py`, is tested and fuzzed against).
A ClientHello is recognised by its handshake layer (record content type 22, handshake type 1); the record-layer
version is never consulted (RFC 8446 5.1: receivers ignore it), so a record version the gateway did not expect
cannot make a ClientHello "not TLS". It never decrypts anything and never answers the client; it only reads the
cleartext ClientHello, which may span several TLS records. Pure: no sockets, no mitmproxy, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_HEADER = 5
CHANGE_CIPHER_SPEC = 0x14
ALERT = 0x15
HANDSHAKE = 0x16
APPLICATION_DATA = 0x17
CLIENT_HELLO = 0x01
SERVER_HELLO = 0x02
EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D
# A ClientHello with post-quantum key shares is ~1.8 KB; 16 KiB (one full record) is far beyond any real one.
MAX_CLIENT_HELLO = 16 * 1024
# Records one ClientHello may span: a real client uses one; 1-byte records of a ~1.8 KB hello still fit.
MAX_CLIENT_HELLO_RECORDS = 2048
MAX_RECORD = 2**14 + 2048


class InvalidClientHello(ValueError):
    """The bytes start like TLS but are not a well-formed ClientHello (or carry an unusable SNI)."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...] = ()  # each protocol id as `protocol_text` writes it
    ech: bool = False  # an encrypted_client_hello extension is present (the SNI is then the outer, public name)


def starts_like_tls(data: bytes) -> bool:
    """True if `data` begins a TLS handshake record (content type 22). The record version is not looked at: a
    ClientHello is recognised by its handshake layer, and every byte after the content type is then checked by
    the parser (a handshake record that does not hold a ClientHello is refused, not relayed)."""
    return bool(data) and data[0] == HANDSHAKE


def record_length(header: bytes | bytearray, offset: int = 0) -> int:
    """The payload length of the record whose header starts at `offset`; raises for 0 or over `MAX_RECORD`."""
    length = int.from_bytes(header[offset + 3 : offset + 5], "big")
    if length == 0 or length > MAX_RECORD:
        raise InvalidClientHello(f"TLS record length {length} is invalid")
    return length


def _handshake_bytes(data: bytes) -> bytes | None:
    """Concatenate handshake record payloads until the ClientHello message is complete; None = need more data."""
    payload = bytearray()
    pos = 0
    records = 0
    while True:
        if payload and payload[0] != CLIENT_HELLO:
            raise InvalidClientHello(f"first handshake message is type {payload[0]}, not ClientHello")
        if len(payload) >= 4:
            needed = 4 + int.from_bytes(payload[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                raise InvalidClientHello(f"ClientHello of {needed} bytes exceeds {MAX_CLIENT_HELLO}")
            if len(payload) >= needed:
                if len(payload) > needed:
                    raise InvalidClientHello("more handshake data follows the ClientHello in its record")
                return bytes(payload[:needed])
        if len(data) - pos < RECORD_HEADER:
            return None
        if data[pos] != HANDSHAKE:
            raise InvalidClientHello("not a TLS handshake record")
        length = record_length(data, pos)
        end = pos + RECORD_HEADER + length
        if end > len(data):
            return None
        records += 1
        if records > MAX_CLIENT_HELLO_RECORDS:
            raise InvalidClientHello(f"ClientHello spans more than {MAX_CLIENT_HELLO_RECORDS} records")
        payload += data[pos + RECORD_HEADER : end]
        pos = end


def _server_name(body: bytes) -> str:
    end = len(body)
    list_end = _skip_vector(body, 0, end, 2, "server_name list")
    pos = 2
    host: str | None = None
    while pos < list_end:
        name_type = body[pos]
        start = pos + 1 + 2
        pos = _skip_vector(body, pos + 1, list_end, 2, "server_name")
        if name_type != 0:
            continue
        if host is not None:
            raise InvalidClientHello("more than one host_name in the server_name extension")
        if pos == start:
            raise InvalidClientHello("empty host_name in the server_name extension")
        try:
            host = body[start:pos].decode("ascii")
        except UnicodeDecodeError:
            raise InvalidClientHello("host_name in the server_name extension is not ASCII") from None
        if not host.isprintable() or " " in host:
            raise InvalidClientHello("host_name in the server_name extension has invalid characters")
    if list_end != end:
        raise InvalidClientHello("trailing bytes in the server_name extension")
    if host is None:
        raise InvalidClientHello("server_name extension without a host_name")
    return host


def protocol_text(raw: bytes) -> str:
    """An ALPN protocol id (opaque bytes, RFC 7301) as text, losslessly and without control characters: printable
    ASCII as is, every other byte and the backslash itself as `\\xNN` (the trail's escape for bytes from the
    wire)."""
    if raw.isascii() and raw.isalnum():
        return raw.decode("ascii")
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


def _alpn(body: bytes) -> tuple[str, ...]:
    list_end = _skip_vector(body, 0, len(body), 2, "ALPN list")
    pos = 2
    out = []
    while pos < list_end:
        start = pos + 1
        pos = _skip_vector(body, pos, list_end, 1, "ALPN protocol")
        out.append(protocol_text(body[start:pos]))
    return tuple(out)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of `data`.

    Returns None when more bytes are needed, raises `InvalidClientHello` when the bytes are not a usable
    ClientHello. Callers check `starts_like_tls` first to tell TLS from other protocols.
    """
    message = _handshake_bytes(data)
    if message is None:
        return None
    return parse_client_hello_message(message)


def parse_client_hello_message(message: bytes) -> ClientHello:
    """Parse one complete ClientHello handshake message (its 4-byte handshake header included).

    Walks the message by offsets (one per field, no reader objects): it runs once per tunnel. The same checks in
    the same order, with the same messages, as a field-by-field reader (tests/wire/test_clienthello.py keeps one as
    the reference)."""
    if len(message) < 4 or message[0] != CLIENT_HELLO:
        raise InvalidClientHello("not a ClientHello message")
    end = len(message)
    if end < 4 + 2:  # handshake header, legacy_version
        raise InvalidClientHello("truncated legacy_version")
    if end < 4 + 2 + 32:  # random
        raise InvalidClientHello("truncated random")
    pos = _skip_vector(message, 4 + 2 + 32, end, 1, "session_id")
    pos = _skip_vector(message, pos, end, 2, "cipher_suites")
    pos = _skip_vector(message, pos, end, 1, "compression_methods")
    if pos == end:
        return ClientHello(sni=None)
    extensions_end = _skip_vector(message, pos, end, 2, "extensions")
    if extensions_end != end:
        raise InvalidClientHello("trailing bytes after the extensions")
    pos += 2
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    while pos < extensions_end:
        if pos + 2 > extensions_end:
            raise InvalidClientHello("truncated extension type")
        ext_type = message[pos] << 8 | message[pos + 1]
        if pos + 4 > extensions_end:
            raise InvalidClientHello("truncated extension length")
        start = pos + 4
        pos = start + (message[pos + 2] << 8 | message[pos + 3])
        if pos > extensions_end:
            raise InvalidClientHello("truncated extension")
        if ext_type in seen:
            raise InvalidClientHello(f"duplicate TLS extension {ext_type}")
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            sni = _server_name(message[start:pos])
        elif ext_type == EXT_ALPN:
            alpn = _alpn(message[start:pos])
    return ClientHello(sni=sni, alpn=alpn, ech=EXT_ENCRYPTED_CLIENT_HELLO in seen)


def _skip_vector(data: bytes, pos: int, end: int, length_size: int, what: str) -> int:
    """The offset after the vector at `pos` (a `length_size`-byte length, then that many bytes), within `end`."""
    start = pos + length_size
    if start > end:
        raise InvalidClientHello(f"truncated {what} length")
    after = start + int.from_bytes(data[pos:start], "big")
    if after > end:
        raise InvalidClientHello(f"truncated {what}")
    return after
