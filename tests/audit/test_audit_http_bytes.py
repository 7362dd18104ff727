"""Issue 16: plain-HTTP and upgraded connections count their bytes, in trail records and metrics alike.

A real gateway between a raw client socket and a raw origin socket, both counting every byte they exchange with it.
The rule (docs/audit.md): `egress.bytes_sent` is the request as the gateway wrote it to the origin (head and body,
chunked framing included), `egress.bytes_received` the response as the gateway wrote it to the client; for an
upgraded connection the upgrade request and the 101 head, then every byte relayed both ways; a git clone over plain
HTTP sums its requests to what the origin read and wrote. The `egress_gateway_bytes_total` counter moves by the same
figures.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from tests.proxy.conftest import PAYMENTS_POD
from tests.support.gateway import REPO, GatewayProcess
from tests.support.origins import RawTcpOrigin

pytestmark = pytest.mark.slow

ORIGIN_IP = "127.0.0.41"
WS_IP = "127.0.0.42"
HOST = "bytes.test"
WS_HOST = "ws-bytes.test"
GIT_IP = "127.0.0.43"
GIT_HOST = "git-bytes.test"


def _read_body(conn: socket.socket, head: bytes, rest: bytes) -> bytes:
    """The rest of a request whose head is `head`: by Content-Length, or chunked up to its last chunk (no
    trailers in these tests)."""
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += conn.recv(65536)
        return rest
    match = re.search(rb"content-length: *(\d+)", lowered)
    length = int(match.group(1)) if match else 0
    while len(rest) < length:
        rest += conn.recv(65536)
    return rest


class CountingOrigin(RawTcpOrigin):
    """Reads one request, answers `response` and closes; keeps how many bytes each connection carried."""

    threaded = True

    def __init__(self, host: str) -> None:
        self.response = b""
        self.received: list[int] = []
        self.done = threading.Event()
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            body = _read_body(conn, head, rest)
            self.received.append(len(head) + 4 + len(body))
            conn.sendall(self.response)
        self.done.set()


class CountingWebSocketOrigin(RawTcpOrigin):
    """A WebSocket echo server (wsproto) that counts the bytes it read and wrote."""

    threaded = True

    def __init__(self, host: str) -> None:
        self.read = 0
        self.written = 0
        self.done = threading.Event()
        super().__init__(host)

    def _send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.written += len(data)

    def handle(self, conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        text = ""
        with conn:
            conn.settimeout(10)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.read += len(data)
                ws.receive_data(data)
                closing = False
                for event in ws.events():
                    if isinstance(event, Request):
                        self._send(conn, ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        text += event.data
                        if event.message_finished:
                            self._send(conn, ws.send(TextMessage(data=f"echo {text}")))
                            text = ""
                    elif isinstance(event, CloseConnection):
                        self._send(conn, ws.send(event.response()))
                        closing = True
                if closing:
                    break
        self.done.set()


@pytest.fixture(scope="module")
def origin() -> Iterator[CountingOrigin]:
    server = CountingOrigin(ORIGIN_IP)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ws_origin() -> Iterator[CountingWebSocketOrigin]:
    server = CountingWebSocketOrigin(WS_IP)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("bytes")
    config: dict[str, Any] = {
        "default_action": "Allow",
        "identity": {
            "mode": ["static"],
            "static": [
                {"cidr": f"{PAYMENTS_POD}/32", "namespace": "shop"},
                {"cidr": "127.0.0.1/32", "namespace": "build"},  # git cannot pick its source address
            ],
        },
        "resolver": {"hosts": {HOST: [ORIGIN_IP], WS_HOST: [WS_IP], GIT_HOST: [GIT_IP]}},
        "allowed_ranges": ["127.0.0.0/8"],
        "audit": {"file": str(workdir / "audit.jsonl")},
    }
    process = GatewayProcess(workdir / "gw", config).start()
    yield process
    process.stop()


def _trail(gateway: GatewayProcess) -> Path:
    return Path(gateway.workdir.parent / "audit.jsonl")


def _closed_records(gateway: GatewayProcess, host: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "egress_gateway", "audit", str(_trail(gateway)), "--host", host, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return [r for r in records if "egress.bytes_sent" in r]


def _record(gateway: GatewayProcess, method: str, host: str = HOST) -> dict[str, Any]:
    """The closed record of the (one) `method` request to `host`, read from the trail with the `audit` command."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for record in _closed_records(gateway, host):
            if record.get("http.request.method") == method:
                return dict(record)
        time.sleep(0.3)
    raise AssertionError(f"no closed record of {method} {host} in the trail")


def _bytes_metric(gateway: GatewayProcess, direction: str, namespace: str = "shop") -> float:
    text = httpx.get(f"{gateway.admin_url}/metrics", timeout=5).text
    for line in text.splitlines():
        labels = f'namespace="{namespace}"' in line and f'direction="{direction}"' in line
        if line.startswith("egress_gateway_bytes_total{") and labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _exchange(gateway: GatewayProcess, request: bytes) -> bytes:
    """Send one proxy request, read everything until the gateway closes."""
    with socket.create_connection(
        ("127.0.0.1", gateway.proxy_port), timeout=15, source_address=(PAYMENTS_POD, 0)
    ) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def _read_until(sock: socket.socket, ws: WSConnection, wanted: type) -> tuple[int, str]:
    """Read until wsproto reports an event of type `wanted` (a whole message): (bytes read, the message text)."""
    read, text = 0, ""
    while True:
        data = sock.recv(65536)
        assert data, "closed early"
        read += len(data)
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    return read, text
            elif isinstance(event, wanted):
                return read, text


def _check(
    gateway: GatewayProcess, origin: CountingOrigin, request: bytes, method: str
) -> tuple[dict[str, Any], bytes]:
    origin.done.clear()
    sent_before, received_before = _bytes_metric(gateway, "sent"), _bytes_metric(gateway, "received")
    answer = _exchange(gateway, request)
    assert origin.done.wait(10)
    record = _record(gateway, method)
    assert record["egress.bytes_sent"] == origin.received[-1]  # what reached the origin, head included
    assert record["egress.bytes_received"] == len(answer)  # what reached the client, head included
    deadline = time.monotonic() + 5
    while _bytes_metric(gateway, "received") - received_before < len(answer) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _bytes_metric(gateway, "sent") - sent_before == origin.received[-1]
    assert _bytes_metric(gateway, "received") - received_before == len(answer)
    return record, answer


def test_a_50kb_post_counts_its_head_and_body(gateway: GatewayProcess, origin: CountingOrigin) -> None:
    body = b"p" * 50_000
    origin.response = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    request = (
        f"POST http://{HOST}:{origin.port}/upload HTTP/1.1\r\nHost: {HOST}:{origin.port}\r\n"
        f"Content-Length: {len(body)}\r\nProxy-Connection: keep-alive\r\n\r\n"
    ).encode() + body
    record, answer = _check(gateway, origin, request, "POST")
    assert answer.startswith(b"HTTP/1.1 201")
    # The origin got the body and a head without the hop-by-hop header and in origin-form: fewer bytes than sent.
    assert len(body) < record["egress.bytes_sent"] < len(request)


def test_a_2mb_get_counts_the_response_as_relayed(gateway: GatewayProcess, origin: CountingOrigin) -> None:
    payload = b"g" * 2_000_000
    origin.response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(payload)
    ) + payload
    request = f"GET http://{HOST}:{origin.port}/big HTTP/1.1\r\nHost: {HOST}:{origin.port}\r\n\r\n".encode()
    record, answer = _check(gateway, origin, request, "GET")
    assert answer == origin.response  # relayed unchanged, so the count is the origin's response too
    assert record["egress.bytes_received"] == len(origin.response)


def test_chunked_messages_count_their_framing(gateway: GatewayProcess, origin: CountingOrigin) -> None:
    origin.response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n1000\r\n" + b"c" * 4096 + b"\r\n0\r\n\r\n"
    )
    chunks = b"a\r\n0123456789\r\n3e8\r\n" + b"b" * 1000 + b"\r\n0\r\n\r\n"
    request = (
        f"PUT http://{HOST}:{origin.port}/chunked HTTP/1.1\r\nHost: {HOST}:{origin.port}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunks
    record, answer = _check(gateway, origin, request, "PUT")
    assert answer.endswith(b"0\r\n\r\n") and b"hello" in answer
    assert record["egress.bytes_sent"] > len(chunks)


def test_a_websocket_counts_the_upgrade_and_every_frame(
    gateway: GatewayProcess, ws_origin: CountingWebSocketOrigin
) -> None:
    sent_before, received_before = _bytes_metric(gateway, "sent"), _bytes_metric(gateway, "received")
    ws = WSConnection(ConnectionType.CLIENT)
    handshake = ws.send(Request(host=f"{WS_HOST}:{ws_origin.port}", target="/socket"))
    handshake = handshake.replace(b"GET /socket ", f"GET http://{WS_HOST}:{ws_origin.port}/socket ".encode(), 1)
    messages = ["hello", "x" * 20_000]
    echoes: list[str] = []
    with socket.create_connection(
        ("127.0.0.1", gateway.proxy_port), timeout=15, source_address=(PAYMENTS_POD, 0)
    ) as sock:
        sock.sendall(handshake)
        received, _ = _read_until(sock, ws, AcceptConnection)
        for message in messages:
            sock.sendall(ws.send(TextMessage(data=message)))
            read, echo = _read_until(sock, ws, TextMessage)
            received += read
            echoes.append(echo)
        sock.sendall(ws.send(CloseConnection(code=1000)))
        while data := sock.recv(65536):
            received += len(data)
    assert echoes == [f"echo {m}" for m in messages]
    assert ws_origin.done.wait(10)
    record = _record(gateway, "GET", WS_HOST)
    assert record["http.response.status_code"] == 101
    assert record["egress.bytes_sent"] == ws_origin.read  # the upgrade request (as rewritten) and every frame
    assert record["egress.bytes_received"] == received == ws_origin.written  # the 101 head and every frame
    assert _bytes_metric(gateway, "sent") - sent_before == ws_origin.read
    assert _bytes_metric(gateway, "received") - received_before == received


class _Counted(io.RawIOBase):
    """A socket file that counts what passes through it."""

    def __init__(self, inner: Any, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read1(len(buffer)) if hasattr(self.inner, "read1") else self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.counter[0] += len(data)
        return len(data)

    def readable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.counter[1] += len(data)
        return int(self.inner.write(data))

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self.inner.flush()


class GitOrigin(ThreadingHTTPServer):
    """A static file server (git's dumb HTTP protocol) over a bare repository, counting the bytes of every exchange:
    [read, written]."""

    daemon_threads = True

    def __init__(self, host: str, root: Path) -> None:
        counted = self.counted = [0, 0]
        self.paths: list[str] = []

        class Handler(SimpleHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def setup(self) -> None:
                super().setup()
                self.rfile = io.BufferedReader(_Counted(self.rfile, counted))
                self.wfile = _Counted(self.wfile, counted)  # type: ignore[assignment]

            def log_message(self, format: str, *args: Any) -> None:
                server.paths.append(self.path)

        server = self
        super().__init__((host, 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def _git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_git_clone_over_plain_http_counts_every_request(gateway: GatewayProcess, tmp_path: Path) -> None:
    work, bare = tmp_path / "work", tmp_path / "repo.git"
    work.mkdir()
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    _git("init", "-q", "-b", "main", cwd=work, env=env)
    (work / "blob.bin").write_bytes(os.urandom(300_000))
    (work / "README").write_text("counted\n")
    _git("add", ".", cwd=work, env=env)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=work, env=env)
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp_path, env=env)
    _git("update-server-info", cwd=bare, env=env)
    origin = GitOrigin(GIT_IP, tmp_path)
    before = _bytes_metric(gateway, "received", "build"), _bytes_metric(gateway, "sent", "build")
    try:
        proxied = {**env, "http_proxy": gateway.proxy_url, "GIT_TERMINAL_PROMPT": "0"}
        _git("clone", "-q", f"http://{GIT_HOST}:{origin.server_port}/repo.git", "clone", cwd=tmp_path, env=proxied)
        assert (tmp_path / "clone" / "blob.bin").read_bytes() == (work / "blob.bin").read_bytes()
        deadline = time.monotonic() + 15
        records: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            records = _closed_records(gateway, GIT_HOST)
            if len(records) >= len(origin.paths):
                break
            time.sleep(0.3)
    finally:
        origin.shutdown()
        origin.server_close()
    assert len(records) == len(origin.paths) >= 3  # info/refs, HEAD, objects...
    read, written = origin.counted
    assert sum(r["egress.bytes_sent"] for r in records) == read
    assert sum(r["egress.bytes_received"] for r in records) == written > 300_000
    assert _bytes_metric(gateway, "received", "build") - before[0] == written
    assert _bytes_metric(gateway, "sent", "build") - before[1] == read
