"""ClientHello parsing from real handshakes (Python's TLS stack writing into memory), fed whole, in pieces, split
across records, and broken."""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable

import pytest
from mitmproxy.proxy.layers.tls import parse_client_hello as mitmproxy_parse

from egress_gateway.wire.clienthello import (
    MAX_CLIENT_HELLO,
    MAX_CLIENT_HELLO_RECORDS,
    ClientHello,
    InvalidClientHello,
    parse_client_hello,
    parse_client_hello_message,
    protocol_text,
    starts_like_tls,
)
from egress_gateway.wire.heads import HeadLimits
from egress_gateway.wire.inspection import TunnelInspector
from tests.support.tls import handmade_client_hello


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def split_into_records(hello: bytes, size: int) -> bytes:
    """Re-frame one handshake record as several records of at most `size` payload bytes (legal TLS)."""
    header, payload = hello[:5], hello[5:]
    out = b""
    for start in range(0, len(payload), size):
        chunk = payload[start : start + size]
        out += header[:3] + len(chunk).to_bytes(2, "big") + chunk
    return out


def test_sni_and_alpn_are_extracted() -> None:
    parsed = parse_client_hello(client_hello("api.example.com", ["h2", "http/1.1"]))
    assert parsed is not None
    assert parsed.sni == "api.example.com"
    assert parsed.alpn == ("h2", "http/1.1")


def test_no_sni_for_ip_literal_connections() -> None:
    parsed = parse_client_hello(client_hello(None))
    assert parsed is not None and parsed.sni is None


def test_incomplete_data_asks_for_more_at_every_length() -> None:
    hello = client_hello("api.example.com")
    for cut in range(len(hello)):
        assert parse_client_hello(hello[:cut]) is None, cut
    assert parse_client_hello(hello) is not None


def test_client_hello_split_across_records() -> None:
    hello = split_into_records(client_hello("split.example.com"), 7)
    parsed = parse_client_hello(hello)
    assert parsed is not None and parsed.sni == "split.example.com"


def test_agrees_with_mitmproxys_parser() -> None:
    for name in ("a.example", "xn--bcher-kva.example", "very.long." * 20 + "example"):
        hello = client_hello(name)
        ours = parse_client_hello(hello)
        theirs = mitmproxy_parse(hello)
        assert ours is not None and theirs is not None
        assert ours.sni == theirs.sni


def test_starts_like_tls_by_the_content_type_alone() -> None:
    assert starts_like_tls(b"\x16")
    assert starts_like_tls(b"\x16\x03\x01\x02\x00")
    # The record version is not consulted (issue 12, class 1): receivers must ignore it (RFC 8446 5.1).
    assert starts_like_tls(b"\x16\x03\x05\x02\x00")
    assert starts_like_tls(b"\x16\x02")
    assert not starts_like_tls(b"GET / HTTP/1.1\r\n")
    assert not starts_like_tls(b"")


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello where a ClientHello belongs
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # ClientHello body too short
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # declared length beyond any real ClientHello
    ],
)
def test_malformed_client_hellos_are_rejected(data: bytes) -> None:
    with pytest.raises(InvalidClientHello):
        parse_client_hello(data)


def test_record_of_another_type_in_the_middle_is_rejected() -> None:
    hello = split_into_records(client_hello("x.example.com"), 50)
    broken = hello[:55] + b"\x17" + hello[56:]
    with pytest.raises(InvalidClientHello):
        parse_client_hello(broken)


def _with_server_name_extension(body: bytes) -> bytes:
    """A minimal ClientHello whose only extension is `server_name` with `body`."""
    extension = (0).to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    extensions = len(extension).to_bytes(2, "big") + extension
    hello_body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + extensions
    handshake = b"\x01" + len(hello_body).to_bytes(3, "big") + hello_body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def _names(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + len(n).to_bytes(2, "big") + n for n in names)
    return len(entries).to_bytes(2, "big") + entries


def test_handmade_client_hello_parses() -> None:
    parsed = parse_client_hello(_with_server_name_extension(_names(b"made.example.com")))
    assert parsed is not None and parsed.sni == "made.example.com"


@pytest.mark.parametrize(
    "body",
    [
        _names(b"a.example.com", b"b.example.com"),  # two host names: which one would the server use?
        _names(b""),
        _names(b"caf\xc3\xa9.example"),  # raw UTF-8 instead of A-labels
        _names(b"bad name.example"),
        _names(b"ok.example.com") + b"\x00",  # trailing garbage
    ],
)
def test_ambiguous_or_invalid_server_names_are_rejected(body: bytes) -> None:
    with pytest.raises(InvalidClientHello):
        parse_client_hello(_with_server_name_extension(body))


# ---- the incremental reader (issue 12, class 8) and the record version (class 1) -------------------------------
# A tunnel reads its ClientHello incrementally through `TunnelInspector`; the one-shot `parse_client_hello` is the
# reference it must agree with, whatever the split.

Outcome = ClientHello | type[InvalidClientHello] | None


def incremental(pieces: list[bytes]) -> Outcome:
    """The first thing a tunnel inspector reports for `pieces`: the hello, InvalidClientHello for a problem, or
    None while it waits."""
    tunnel = TunnelInspector(HeadLimits())
    for piece in pieces:
        seen = tunnel.client_data(piece).seen
        if seen:
            return seen[0].hello if seen[0].problem is None else InvalidClientHello
    return None


def one_shot(data: bytes) -> Outcome:
    try:
        return parse_client_hello(data)
    except InvalidClientHello:
        return InvalidClientHello


def test_incremental_reading_equals_the_one_shot_parse_at_every_split() -> None:
    for hello in (client_hello("api.example.com", ["h2"]), split_into_records(client_hello("s.example"), 7)):
        expected = parse_client_hello(hello)
        assert expected is not None
        for cut in range(len(hello) + 1):
            assert incremental([hello[:cut], hello[cut:]]) == expected, cut


def test_incremental_reading_one_byte_at_a_time_releases_the_hello_only_when_whole() -> None:
    hello = split_into_records(client_hello("dribble.example"), 16)
    tunnel = TunnelInspector(HeadLimits())
    for index in range(len(hello) - 1):
        step = tunnel.client_data(hello[index : index + 1])
        assert step.release == b"" and step.seen == []
    last = tunnel.client_data(hello[-1:])
    assert last.release == hello and last.seen[0].hello is not None and last.seen[0].hello.sni == "dribble.example"


@pytest.mark.parametrize("version", [b"\x03\x05", b"\x03\x00", b"\x00\x00", b"\xfe\xfd", b"\xff\xff"])
def test_any_record_version_is_parsed_and_its_sni_read(version: bytes) -> None:
    hello = client_hello("denied.example")
    rewritten = hello[:1] + version + hello[3:]
    assert starts_like_tls(rewritten)
    parsed = parse_client_hello(rewritten)
    assert parsed is not None and parsed.sni == "denied.example"
    assert incremental([rewritten]) == parsed


def test_client_hello_over_the_record_cap_is_refused() -> None:
    hello = split_into_records(client_hello("many.example"), 1)
    assert len(hello) // 6 <= MAX_CLIENT_HELLO_RECORDS  # a real hello in 1-byte records still fits
    announced = b"\x01" + (MAX_CLIENT_HELLO - 4).to_bytes(3, "big") + bytes(MAX_CLIENT_HELLO_RECORDS)
    too_many = split_into_records(b"\x16\x03\x01\x00\x00" + announced, 1)
    with pytest.raises(InvalidClientHello, match="records"):
        parse_client_hello(too_many)
    assert incremental([too_many]) is InvalidClientHello


def test_client_hello_over_the_size_cap_is_refused_as_soon_as_announced() -> None:
    header = b"\x16\x03\x01\x00\x04\x01" + (MAX_CLIENT_HELLO - 3).to_bytes(3, "big")
    with pytest.raises(InvalidClientHello, match="exceeds"):
        parse_client_hello(header)
    assert incremental([header]) is InvalidClientHello


def test_random_splits_agree_with_the_one_shot_parse() -> None:
    rng = random.Random(12)
    samples = [client_hello("a.example"), split_into_records(client_hello("b.example"), 3)]
    samples += [s[:n] for s in samples for n in (1, 5, 9, 40)]
    samples += [b"\x16" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))) for _ in range(300)]
    samples += [s[:5] + bytes([s[5] ^ 1]) + s[6:] for s in samples[:2]]  # not a ClientHello
    samples += [s + b"\x01" for s in samples[:2]]  # a stray byte after the record
    for data in samples:
        expected = one_shot(data)
        for _ in range(5):
            cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(4)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            assert incremental(pieces) == expected, (data, cuts)


def test_alpn_ids_are_kept_in_order_and_escaped_losslessly() -> None:
    hello = handmade_client_hello("api.example.com", [b"h2", b"a,b", b"x\x01\x1b[31m", b"\xff\\"])
    parsed = parse_client_hello(hello)
    assert parsed is not None
    # a comma stays inside its id; control characters, non-ASCII bytes and the backslash are written as \xNN
    assert parsed.alpn == ("h2", "a,b", "x\\x01\\x1b[31m", "\\xff\\x5c")
    assert all(protocol.isprintable() for protocol in parsed.alpn)


def test_ech_presence_is_parsed() -> None:
    with_ech = parse_client_hello(handmade_client_hello("public.example.com", [b"h2"], ech=True))
    without = parse_client_hello(handmade_client_hello("public.example.com", [b"h2"]))
    assert with_ech is not None and with_ech.ech and with_ech.sni == "public.example.com"
    assert without is not None and not without.ech
    real = parse_client_hello(client_hello("api.example.com"))  # Python's OpenSSL sends no ECH
    assert real is not None and not real.ech


# ---- the message parser walks offsets; a field-by-field reader is the reference it must agree with ------------------


class _FieldReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > len(self.data):
            raise InvalidClientHello(f"truncated {what}")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def vector(self, length_size: int, what: str) -> bytes:
        return self.take(int.from_bytes(self.take(length_size, f"{what} length"), "big"), what)


def reference_parse(message: bytes) -> ClientHello:
    """RFC 8446 4.1.2 read field by field (the parser before it walked offsets), for the extensions it reads."""
    if len(message) < 4 or message[0] != 1:
        raise InvalidClientHello("not a ClientHello message")
    reader = _FieldReader(message[4:])
    reader.take(2, "legacy_version")
    reader.take(32, "random")
    reader.vector(1, "session_id")
    reader.vector(2, "cipher_suites")
    reader.vector(1, "compression_methods")
    if reader.pos == len(reader.data):
        return ClientHello(sni=None)
    extensions = _FieldReader(reader.vector(2, "extensions"))
    if reader.pos != len(reader.data):
        raise InvalidClientHello("trailing bytes after the extensions")
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    while extensions.pos < len(extensions.data):
        ext_type = int.from_bytes(extensions.take(2, "extension type"), "big")
        body = extensions.vector(2, "extension")
        if ext_type in seen:
            raise InvalidClientHello(f"duplicate TLS extension {ext_type}")
        seen.add(ext_type)
        if ext_type == 0:
            sni = _reference_server_name(body)
        elif ext_type == 16:
            alpn = _reference_alpn(body)
    return ClientHello(sni=sni, alpn=alpn, ech=0xFE0D in seen)


def _reference_server_name(body: bytes) -> str:
    reader = _FieldReader(body)
    names = _FieldReader(reader.vector(2, "server_name list"))
    host: str | None = None
    while names.pos < len(names.data):
        name_type = names.take(1, "server_name type")[0]
        value = names.vector(2, "server_name")
        if name_type != 0:
            continue
        if host is not None:
            raise InvalidClientHello("more than one host_name in the server_name extension")
        if not value:
            raise InvalidClientHello("empty host_name in the server_name extension")
        try:
            host = value.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidClientHello("host_name in the server_name extension is not ASCII") from None
        if not host.isprintable() or " " in host:
            raise InvalidClientHello("host_name in the server_name extension has invalid characters")
    if reader.pos != len(reader.data):
        raise InvalidClientHello("trailing bytes in the server_name extension")
    if host is None:
        raise InvalidClientHello("server_name extension without a host_name")
    return host


def _reference_alpn(body: bytes) -> tuple[str, ...]:
    protocols = _FieldReader(_FieldReader(body).vector(2, "ALPN list"))
    out = []
    while protocols.pos < len(protocols.data):
        out.append(protocol_text(protocols.vector(1, "ALPN protocol")))
    return tuple(out)


def _message_with(ext_type: int, body: bytes) -> bytes:
    """A minimal ClientHello message carrying one extension."""
    extension = ext_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body
    fields = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    fields += len(extension).to_bytes(2, "big") + extension
    return b"\x01" + len(fields).to_bytes(3, "big") + fields


def _extension_block(message: bytes) -> bytes:
    pos = 4 + 2 + 32
    pos += 1 + message[pos]  # session_id
    pos += 2 + int.from_bytes(message[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + message[pos]  # compression_methods
    return message[pos + 2 :]


def _extension_body(message: bytes, wanted: int) -> bytes:
    block = _extension_block(message)
    pos = 0
    while pos < len(block):
        ext_type, length = int.from_bytes(block[pos : pos + 2], "big"), int.from_bytes(block[pos + 2 : pos + 4], "big")
        if ext_type == wanted:
            return block[pos + 4 : pos + 4 + length]
        pos += 4 + length
    raise AssertionError(f"no extension {wanted}")


def _outcome(parse: Callable[[bytes], ClientHello], message: bytes) -> ClientHello | str:
    try:
        return parse(message)
    except InvalidClientHello as exc:
        return f"InvalidClientHello: {exc}"


def test_the_message_parser_agrees_with_a_field_by_field_reader_on_real_truncated_and_mutated_hellos() -> None:
    rng = random.Random(21)
    messages = [
        client_hello(name, alpn)[5:]
        for name, alpn in (("api.example.com", ["h2", "http/1.1"]), (None, None), ("x.test", None))
    ]
    cases = [m[:end] for m in messages for end in range(len(m) + 1)]
    for _ in range(4000):
        message = bytearray(rng.choice(messages))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(message))
            if rng.random() < 0.7:  # a length field or anything else changed
                message[at] = rng.choice((0, 1, 2, 0xFF, rng.randrange(256)))
            else:
                del message[at]
        cases.append(bytes(message))
    # Well-framed messages whose extension block is cut at every byte, has a length byte off by one, or is random:
    # the extension loop's own bounds, which a cut message rarely reaches.
    fields = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    real = _extension_block(messages[0])
    blocks = [real[:end] for end in range(len(real) + 1)]
    blocks += [
        real[:at] + bytes([(real[at] + delta) % 256]) + real[at + 1 :] for at in range(len(real)) for delta in (-1, 1)
    ]
    blocks += [bytes(rng.randrange(256) for _ in range(rng.randrange(12))) for _ in range(2000)]
    cases += [
        b"\x01" + (len(fields) + 2 + len(b)).to_bytes(3, "big") + fields + len(b).to_bytes(2, "big") + b for b in blocks
    ]
    # The server_name and ALPN bodies alone: real ones cut, off by one, and random, and hand-made lists.
    for ext_type, real_body in ((0, _extension_body(messages[0], 0)), (16, _extension_body(messages[0], 16))):
        bodies = [real_body[:end] for end in range(len(real_body) + 1)]
        bodies += [
            real_body[:at] + bytes([(real_body[at] + delta) % 256]) + real_body[at + 1 :]
            for at in range(len(real_body))
            for delta in (-1, 1)
        ]
        bodies += [bytes(rng.randrange(256) for _ in range(rng.randrange(10))) for _ in range(1000)]
        bodies += [
            _names(b"a.test", b"b.test"),
            _names(b""),
            _names(b"caf\xc3\xa9"),
            _names(b"a b"),
            _names(b"x") + b"\0",
        ]
        cases += [_message_with(ext_type, body) for body in bodies]
    agreed_on_hellos = 0
    for message in cases:
        got, expected = _outcome(parse_client_hello_message, message), _outcome(reference_parse, message)
        assert got == expected, message
        agreed_on_hellos += isinstance(got, ClientHello)
    assert agreed_on_hellos > 50
