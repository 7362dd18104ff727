"""TLS bytes for hostile-input tests: real ClientHellos from Python's ssl, re-fragmented, and hand-built ones.

`real_client_hello` captures the first flight of a real client (ssl.MemoryBIO, no socket); `refragment` splits its
handshake message over many TLS records; `crafted_client_hello` builds a minimal ClientHello whose server_name
extension holds exactly the entries a test asks for; `handshake_with_first_flight` completes a real handshake over
a socket after sending the first flight in a test-chosen shape.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class ClientSide:
    """A TLS client over memory BIOs whose first flight (the ClientHello record) was already produced."""

    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    first_flight: bytes


def real_client_hello(context: ssl.SSLContext, server_hostname: str) -> ClientSide:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return ClientSide(tls, incoming, outgoing, outgoing.read())


def refragment(first_flight: bytes, size: int) -> bytes:
    """Re-send the handshake payload of the first record as records of at most `size` bytes each."""
    assert first_flight[0] == 0x16
    length = struct.unpack("!H", first_flight[3:5])[0]
    payload, rest = first_flight[5 : 5 + length], first_flight[5 + length :]
    out = b""
    for start in range(0, len(payload), size):
        chunk = payload[start : start + size]
        out += first_flight[:3] + struct.pack("!H", len(chunk)) + chunk
    return out + rest


def _vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def crafted_client_hello(server_names: list[tuple[int, bytes]] | None, extra_sni_extension: bool = False) -> bytes:
    """A TLS 1.2-style ClientHello record; `server_names` = [(name_type, name)], None = no SNI extension."""
    extensions = b""
    if server_names is not None:
        entries = b"".join(bytes([kind]) + _vector(2, name) for kind, name in server_names)
        sni = struct.pack("!H", 0) + _vector(2, _vector(2, entries))
        extensions += sni
        if extra_sni_extension:
            extensions += sni
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + _vector(1, b"")
        + _vector(2, b"\xc0\x2f\xc0\x2b")
        + _vector(1, b"\x00")
        + _vector(2, extensions)
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _vector(2, handshake)


def handshake_with_first_flight(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_hostname: str,
    send_first_flight: Callable[[socket.socket, bytes], None],
    timeout: float = 10.0,
) -> ssl.SSLObject:
    """Run a real TLS handshake over `sock`; the first flight goes out through `send_first_flight`."""
    client = real_client_hello(context, server_hostname)
    send_first_flight(sock, client.first_flight)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.tls.do_handshake()
        except ssl.SSLWantReadError:
            pending = client.outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the TLS handshake") from None
            client.incoming.write(data)
            continue
        pending = client.outgoing.read()
        if pending:
            sock.sendall(pending)
        return client.tls
    raise TimeoutError("TLS handshake did not finish")
