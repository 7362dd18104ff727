"""Origin servers for proxy tests: HTTP and HTTPS on a loopback address, recording every TCP accept.

Each response is JSON describing what the origin saw (method, path, headers, TLS server name), so a test can
assert both what reached a destination and that nothing did (`accepted == 0`).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    server: OriginServer
    protocol_version = "HTTP/1.1"

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return bytes(body)
            body += self.rfile.read(size)
            self.rfile.readline()  # the CRLF after the chunk

    def _answer(self) -> None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = self._read_chunked()  # a keep-alive origin must consume the body to find the next request
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        sni = getattr(self.connection, "egress_test_sni", None)
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "sni": sni,
            "body": body.decode("utf-8", "replace"),
            "origin": self.server.name,
        }
        self.server.requests.append(seen)
        payload = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OriginServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, tls: ssl.SSLContext | None = None, name: str = "origin", port: int = 0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.tls = tls
        self.name = name
        self.accepted = 0
        self.peers: list[tuple[str, int]] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        if tls is not None:
            tls.sni_callback = self._sni
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @staticmethod
    def _sni(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.egress_test_sni = name  # type: ignore[union-attr]

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, peer = self.socket.accept()
        with self._lock:
            self.accepted += 1
            self.peers.append(peer)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            sock.settimeout(10)
        return sock, peer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-handshake are expected in these tests

    def start(self) -> OriginServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class RawTcpOrigin:
    """A bare TCP listener on loopback whose `handle(conn)` runs for each accepted connection; for origins that
    misbehave below HTTP (resets, endless streams). Subclasses set what `handle` does."""

    threaded = False  # True: each connection in its own thread (for handlers that run long)

    def __init__(self, host: str) -> None:
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.threaded:
                threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
            else:
                self.handle(conn)

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
