"""What a CONNECT tunnel carries is checked, whichever way the tunnel starts (a CONNECT that opens the connection,
or one after plain HTTP that the session takes back from mitmproxy): issue 12, classes 1, 2, 3, 8 and 12
(docs/security.md).

- a ClientHello is recognised by its handshake layer, whatever its record-layer version (class 1);
- every ClientHello before the handshake turns encrypted is checked: the one answering a HelloRetryRequest from a
  real `openssl s_server` must repeat the SNI (class 2);
- HTTP inside a tunnel is checked like plain HTTP, request by request; opaque TCP needs a rule listing `TCP`
  (class 3);
- a ClientHello dribbled in 1-byte records is refused at the record cap and does not starve others (class 8);
- `allowed.test..` as SNI is not the CONNECT host (class 12).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.hardening.conftest import HRR_ORIGIN, Env, accepted_after
from tests.hardening.tlsbytes import crafted_client_hello, real_client_hello, refragment
from tests.proxy.conftest import closed_by_peer, connect, raw_request
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

PATHS = ["listener", "mitmproxy"]
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def open_tunnel(env: Env, authority: str, source: str, path: str) -> socket.socket:
    """An established tunnel. `mitmproxy`: the connection first carries a plain-HTTP request, which mitmproxy
    serves; the session takes the connection back for the CONNECT."""
    if path == "listener":
        answer = connect(env.gateway.proxy_port, authority, source=source)
        assert answer.status == 200, answer.body
        return answer.sock
    plain = f"plain.test:{env.plain.port}"
    first = raw_request(
        env.gateway.proxy_port, f"GET http://{plain}/first HTTP/1.1\r\nHost: {plain}\r\n\r\n".encode(), source
    )
    assert first.status == 200, first.body
    sock = first.sock
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def with_record_version(flight: bytes, version: bytes) -> bytes:
    """The first record of `flight` with its record-layer version bytes rewritten (a loopback shim would do the
    same to a stock client's first write)."""
    return flight[:1] + version + flight[3:]


def drive_handshake(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    sock.settimeout(10)
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            if pending := outgoing.read():
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the TLS handshake") from None
            incoming.write(data)
            continue
        if pending := outgoing.read():
            sock.sendall(pending)
        return


# ---- class 1: the record-layer version does not decide what is TLS --------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("version", ["0305", "0300", "0000", "fefd", "ffff"])
def test_denied_sni_behind_an_allowed_connect_is_closed_whatever_the_record_version(
    env: Env, path: str, version: str
) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = open_tunnel(env, f"allowed.test:{env.tls.port}", source, path)
    hello = real_client_hello(env.ca.client_context(), "denied.test").first_flight
    sock.sendall(with_record_version(hello, bytes.fromhex(version)))
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("tls.client.server_name") == "denied.test")
    assert record["egress.decision"] == "deny"
    assert record["egress.reason"] in ("sni_mismatch", "denied_by_rule")
    assert accepted_after(env.tls, before) == 0
    env.assert_still_serves()


@pytest.mark.parametrize("path", PATHS)
def test_real_handshake_with_an_unusual_record_version_is_checked_and_completes(env: Env, path: str) -> None:
    """A stock client whose first record says 0x0305: the SNI is read and allowed, and the origin (which must
    ignore that field) completes TLS 1.3 with it."""
    source = env.fresh_source()
    sock = open_tunnel(env, f"allowed.test:{env.tls.port}", source, path)
    client = real_client_hello(env.ca.client_context(), "allowed.test")
    sock.sendall(with_record_version(client.first_flight, b"\x03\x05"))
    drive_handshake(sock, client.tls, client.incoming, client.outgoing)
    assert client.tls.version() == "TLSv1.3"
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("tls.client.server_name") == "allowed.test")
    assert record["egress.decision"] == "allow" and record["egress.protocol"] == "TLS"


@pytest.mark.parametrize("path", PATHS)
def test_handshake_record_that_is_not_a_client_hello_is_refused_not_relayed(env: Env, path: str) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = open_tunnel(env, f"allowed.test:{env.tls.port}", source, path)
    sock.sendall(b"\x16\x03\x05\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00")  # a "ServerHello" from the client
    assert closed_by_peer(sock)
    sock.close()
    env.decision(source, "bad_request")
    assert accepted_after(env.tls, before) == 0


# ---- class 12: one normalizer for SNI ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sni", [b"allowed.test..", b"allowed.test...", b".allowed.test"])
def test_sni_spellings_the_normalizer_rejects_never_match_the_connect_host(env: Env, path: str, sni: bytes) -> None:
    source = env.fresh_source()
    before = env.tls.accepted
    sock = open_tunnel(env, f"allowed.test:{env.tls.port}", source, path)
    sock.sendall(crafted_client_hello([(0, sni)]))
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.decision") == "deny")
    assert record["egress.reason"] in ("invalid_target", "bad_request"), record
    assert accepted_after(env.tls, before) == 0


# ---- class 2: every ClientHello, HelloRetryRequest included ----------------------------------------------------


@dataclass
class RecordingShim:
    """A TCP relay on HRR_ORIGIN in front of `openssl s_server`, keeping every byte clients sent through it."""

    target: tuple[str, int]
    received: list[bytes] = field(default_factory=list)
    accepted: int = 0

    def __post_init__(self) -> None:
        self.listener = socket.create_server((HRR_ORIGIN, 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        index = len(self.received)
        self.received.append(b"")
        with client, socket.create_connection(self.target, timeout=10) as server:

            def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        if record:
                            self.received[index] += data
                        dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pump, args=(server, client, False), daemon=True)
            back.start()
            pump(client, server, True)
            back.join(10)

    def stop(self) -> None:
        self._stop = True
        self.listener.close()


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def hrr_origin(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingShim]:
    """`openssl s_server` accepting TLS 1.3 with P-256 only: a client that key-shares X25519 first (Python's ssl,
    OpenSSL's default) gets a HelloRetryRequest and must send a second ClientHello."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    leaf = TestCA(tmp_path_factory.mktemp("hrr-ca")).issue("hrr.test", "denied.test")
    host, port = "127.0.0.16", _free_port("127.0.0.16")
    command = [openssl, "s_server", "-accept", f"{host}:{port}", "-cert", str(leaf.cert), "-key", str(leaf.key)]
    command += ["-tls1_3", "-groups", "P-256", "-www", "-quiet"]
    server = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            break
        time.sleep(0.05)
    shim = RecordingShim((host, port))
    try:
        yield shim
    finally:
        shim.stop()
        server.terminate()
        server.wait(10)


def _unverified_tls13() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the handshake is what is tested; the CA of s_server is throwaway
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _read_server_flight(sock: socket.socket, until: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("path", PATHS)
def test_legitimate_hello_retry_request_with_the_same_sni_completes(
    env: Env, hrr_origin: RecordingShim, path: str
) -> None:
    source = env.fresh_source()
    sock = open_tunnel(env, f"hrr.test:{hrr_origin.port}", source, path)
    client = real_client_hello(_unverified_tls13(), "hrr.test")
    sock.sendall(client.first_flight)
    server_flight = _read_server_flight(sock, HRR_RANDOM)
    assert HRR_RANDOM in server_flight  # the origin really asked for a second ClientHello
    client.incoming.write(server_flight)
    drive_handshake(sock, client.tls, client.incoming, client.outgoing)
    assert client.tls.version() == "TLSv1.3"
    client.tls.write(b"GET / HTTP/1.0\r\n\r\n")
    sock.sendall(client.outgoing.read())
    assert sock.recv(65536)  # application data flows after the second ClientHello was checked
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("tls.client.server_name") == "hrr.test")
    assert record["egress.decision"] == "allow"
    assert not [d for d in env.decisions(source) if d.get("egress.decision") == "deny"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("second_sni", ["denied.test", "other.hrr.test", None])
def test_second_client_hello_with_another_sni_closes_the_tunnel_before_the_origin_sees_it(
    env: Env, hrr_origin: RecordingShim, path: str, second_sni: str | None
) -> None:
    source = env.fresh_source()
    seen_before = len(hrr_origin.received)
    sock = open_tunnel(env, f"hrr.test:{hrr_origin.port}", source, path)
    client = real_client_hello(_unverified_tls13(), "hrr.test")
    sock.sendall(client.first_flight)
    server_flight = _read_server_flight(sock, HRR_RANDOM)
    assert HRR_RANDOM in server_flight
    # The second ClientHello comes from another client object: the name it carries is the attacker's choice.
    other = real_client_hello(_unverified_tls13(), second_sni)  # type: ignore[arg-type]
    sock.sendall(b"\x14\x03\x03\x00\x01\x01" + other.first_flight)  # compat ChangeCipherSpec, then the hello
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.decision") == "deny")
    assert record["egress.reason"] in ("sni_mismatch", "denied_by_rule"), record
    time.sleep(0.3)
    sent_to_origin = b"".join(hrr_origin.received[seen_before:])
    assert client.first_flight in sent_to_origin  # the first hello did reach it
    assert other.first_flight[5:] not in sent_to_origin  # the second never did
    if second_sni is not None:
        assert second_sni.encode() not in sent_to_origin


# ---- class 3: HTTP and opaque bytes in a tunnel --------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "host", ["denied.test", "allowed.test", "plain.test.evil.test", "plain.test:1", "plain.test@denied.test"]
)
def test_http_in_a_tunnel_with_another_host_is_closed_before_the_origin(env: Env, path: str, host: str) -> None:
    source = env.fresh_source()
    before = len(env.plain.requests)
    sock = open_tunnel(env, f"plain.test:{env.plain.port}", source, path)
    sock.sendall(f"GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.protocol") == "HTTP")
    assert record["egress.decision"] == "deny"
    assert record["egress.reason"] in ("host_mismatch", "denied_by_rule", "bad_request"), record
    time.sleep(0.3)
    assert not [r for r in env.plain.requests[before:] if r["path"] == "/smuggled"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("framing", ["content-length", "chunked", "pipelined"])
def test_every_request_in_a_kept_alive_tunnel_is_checked(env: Env, path: str, framing: str) -> None:
    source = env.fresh_source()
    before = len(env.plain.requests)
    sock = open_tunnel(env, f"plain.test:{env.plain.port}", source, path)
    good = b"POST /first HTTP/1.1\r\nHost: plain.test\r\n"
    if framing == "chunked":
        good += b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    else:
        good += b"Content-Length: 5\r\n\r\nhello"
    bad = b"GET /second HTTP/1.1\r\nHost: denied.test\r\n\r\n"
    if framing == "pipelined":
        sock.sendall(good + bad)
    else:
        sock.sendall(good)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(bad)
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.decision") == "deny")
    assert record["egress.reason"] in ("host_mismatch", "denied_by_rule"), record
    time.sleep(0.3)
    paths = [r["path"] for r in env.plain.requests[before:]]
    assert "/second" not in paths
    if framing != "pipelined":
        assert "/first" in paths


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "first_bytes",
    [
        bytes.fromhex("802e0103010015000000100100800300800700c006004002008004008000") + bytes(16),  # SSLv2 hello
        b"\x00\x01binary",
        b"get / HTTP/1.1\r\nHost: denied.test\r\n\r\n",  # not a request line as clients send it: opaque
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge: its authority is not readable
    ],
)
def test_opaque_bytes_are_refused_where_no_rule_allows_tcp(env: Env, path: str, first_bytes: bytes) -> None:
    source = env.fresh_source()
    before = env.plain.accepted
    sock = open_tunnel(env, f"plain.test:{env.plain.port}", source, path)
    sock.sendall(first_bytes)
    assert closed_by_peer(sock)
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.decision") == "deny")
    assert record["egress.reason"] == "protocol_not_allowed", record
    assert record["egress.protocol"] == "TCP"
    assert accepted_after(env.plain, before) == (1 if path == "mitmproxy" else 0)  # mitmproxy's: the first GET


@pytest.mark.parametrize("path", PATHS)
def test_opaque_bytes_pass_where_a_rule_lists_tcp_and_are_recorded_as_tcp(env: Env, path: str) -> None:
    source = env.fresh_source()
    sock = open_tunnel(env, f"tcp.test:{env.plain.port}", source, path)
    sock.sendall(b"\x00\x01binary\r\n\r\n")
    assert closed_by_peer(sock)  # the origin answers 400 to the bytes and closes: they reached it
    sock.close()
    record = env.wait_decision(source, lambda e: e.get("egress.protocol") == "TCP")
    assert record["egress.decision"] == "allow"


def test_a_rule_that_lists_only_tcp_does_not_allow_tls(env: Env) -> None:
    source = env.fresh_source()
    sock = open_tunnel(env, f"tcp.test:{env.tls.port}", source, "listener")
    sock.sendall(real_client_hello(env.ca.client_context(), "tcp.test").first_flight)
    assert closed_by_peer(sock)
    sock.close()
    record = env.decision(source, "protocol_not_allowed")
    assert record["egress.protocol"] == "TLS"


# ---- class 8: dribbled ClientHellos are bounded and do not starve others ---------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_dribbled_client_hellos_are_refused_at_the_record_cap_and_others_are_still_served(env: Env, path: str) -> None:
    """Three clients send a ClientHello announced at 16 KiB in 1-byte records (the issue's attack). Each is closed
    with a `bad_request` record once it crosses the record cap, and meanwhile another namespace's CONNECT and TLS
    handshake complete. Work per byte is bounded, so no tight timing is asserted: only that the others were served
    at all while the dribblers ran, within a very generous bound."""
    hello = crafted_client_hello([(0, b"allowed.test")])
    body = hello[5:]
    padded = body[:1] + (16 * 1024 - 4).to_bytes(3, "big") + body[4:] + bytes(16 * 1024)
    records = refragment(b"\x16\x03\x01" + len(padded).to_bytes(2, "big") + padded, 1)
    sources = [env.fresh_source() for _ in range(3)]
    results: dict[str, bool] = {}

    def dribble(source: str) -> None:
        sock = open_tunnel(env, f"allowed.test:{env.tls.port}", source, path)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        closed = False
        try:
            for start in range(0, 6 * 4000, 6 * 40):  # 4000 records, 40 per write
                sock.sendall(records[start : start + 6 * 40])
        except OSError:
            closed = True
        results[source] = closed or closed_by_peer(sock)
        sock.close()

    threads = [threading.Thread(target=dribble, args=(s,)) for s in sources]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    env.assert_still_serves()
    served_in = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    assert all(results.get(s) for s in sources), results
    for source in sources:
        record = env.decision(source, "bad_request")
        assert "records" in record["egress.message"], record
    assert served_in < 10, served_in
