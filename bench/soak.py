"""Bounded soak of the gateway: mixed load for N minutes while the process's RSS and open descriptors are sampled.

Load (all on loopback): allowed HTTPS through CONNECT with a real TLS handshake, denied CONNECTs, plain-HTTP
requests, 1 MiB bulk downloads, hostile request heads, and a pool of idle tunnels that is recycled; a policy file is
rewritten every few seconds (each edit also re-decides every open tunnel). Every answer is checked against its
expected outcome; anything else counts as an error.

    .venv/bin/python bench/soak.py --minutes 10 --markdown /tmp/soak.md

Prints one JSON object (samples and verdict) on stdout; exits 1 if there were errors or RSS/descriptors were not
flat after warm-up. Self-contained: imports nothing from egress_gateway or the test suite; talks to the gateway only
through its command line, config file and sockets.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import random
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
CLIENT = "127.0.0.2"
TLS_ORIGIN = "127.0.0.10"
PLAIN_ORIGIN = "127.0.0.12"
BULK_BYTES = 1024 * 1024

POLICY = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: soak, namespace: soak}
spec:
  rules:
    - name: origins
      hosts: [allowed.test, plain.test]
    - name: no-denied
      action: Deny
      hosts: [denied.test]
"""

EDITED = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: soak-edits, namespace: soak}}
spec:
  rules:
    - name: edit-{n}
      hosts: [{hosts}]
"""


# ---- certificates and origins ----------------------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA certificate for allowed.test (the client trusts it directly)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("allowed.test"), x509.IPAddress(ipaddress.ip_address(TLS_ORIGIN))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "origin.pem", directory / "origin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bulk = b"b" * BULK_BYTES

    def do_GET(self) -> None:
        body = self.bulk if self.path.startswith("/bulk") else b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, tls: ssl.SSLContext | None) -> None:
        super().__init__((host, 0), _Handler)
        self.tls = tls
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, peer = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            sock.settimeout(120)  # idle tunnels stay open for their whole 30 s
        return sock, peer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass

    @property
    def port(self) -> int:
        return int(self.server_address[1])


# ---- the gateway -----------------------------------------------------------------------------------------------------


class GatewayUnderTest:
    def __init__(self, workdir: Path) -> None:
        self.policies = workdir / "policies"
        self.policies.mkdir()
        (self.policies / "soak.yaml").write_text(POLICY)
        config = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "policies_path": str(self.policies),
            "allowed_ranges": ["127.0.0.0/8"],
            "identity": {"static": [{"cidr": f"{CLIENT}/32", "namespace": "soak", "pod": "load"}]},
            "resolver": {
                "hosts": {"allowed.test": [TLS_ORIGIN], "denied.test": [TLS_ORIGIN], "plain.test": [PLAIN_ORIGIN]}
            },
            "log": {"level": "info", "format": "json"},
            "shutdown_grace_s": 2,
        }
        self.config = workdir / "gateway.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.stderr = (workdir / "gateway.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "egress_gateway", "run", "--config", str(self.config)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            env={k: v for k, v in os.environ.items() if not k.startswith("EGRESS_GATEWAY_")},
        )
        self.port = self._wait_listening(workdir / "gateway.log")

    def _wait_listening(self, log: Path, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in log.read_text().splitlines():
                if '"gateway_listening"' in line:
                    return int(json.loads(line)["listen"][0].rsplit(":", 1)[1])
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("gateway did not start listening")

    def sample(self) -> tuple[int, int]:
        """(RSS bytes, open descriptors) of the gateway process."""
        rss = 0
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.stderr.close()


# ---- the load --------------------------------------------------------------------------------------------------------


def _connect(port: int, authority: str) -> tuple[socket.socket, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(CLIENT, 0))
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return sock, status


def _read_response(stream: Any) -> tuple[int, int]:
    """(status, body length) of one Content-Length response from a file-like stream."""
    status_line = stream.readline()
    status = int(status_line.split(b" ", 2)[1]) if status_line.startswith(b"HTTP/1.") else 0
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = stream.read(length) if length else b""
    return status, len(body)


@dataclass
class Load:
    port: int
    tls_port: int
    plain_port: int
    client_tls: ssl.SSLContext
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, kind: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.counts[kind] += 1
            if not ok:
                self.counts[f"{kind}_errors"] += 1
                if len(self.errors) < 50:
                    self.errors.append(f"{kind}: {detail}")

    def https(self, path: str, expected_length: int) -> None:
        sock, status = _connect(self.port, f"allowed.test:{self.tls_port}")
        with sock:
            if status != 200:
                self.count("https", False, f"CONNECT {status}")
                return
            with self.client_tls.wrap_socket(sock, server_hostname="allowed.test") as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n".encode())
                got, length = _read_response(tls.makefile("rb"))
        self.count("bulk" if path == "/bulk" else "https", got == 200 and length == expected_length, f"{got} {length}")

    def denied(self) -> None:
        sock, status = _connect(self.port, f"denied.test:{self.tls_port}")
        sock.close()
        self.count("denied", status == 403, str(status))

    def plain(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=15, source_address=(CLIENT, 0)) as sock:
            host = f"plain.test:{self.plain_port}"
            sock.sendall(f"GET http://{host}/tiny HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            got, length = _read_response(sock.makefile("rb"))
        self.count("plain", got == 200 and length == 3, f"{got} {length}")

    def hostile(self, rng: random.Random) -> None:
        heads = [
            b"\x00\x01garbage\r\n\r\n",
            b"CONNECT allowed.test:0 HTTP/1.1\r\n\r\n",
            b"GET http://plain.test/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST http://plain.test/ HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
        ]
        with socket.create_connection(("127.0.0.1", self.port), timeout=15, source_address=(CLIENT, 0)) as sock:
            sock.sendall(rng.choice(heads))
            got, _ = _read_response(sock.makefile("rb"))
        self.count("hostile", got == 400, str(got))

    def step(self, rng: random.Random) -> None:
        roll = rng.random()
        try:
            if roll < 0.55:
                self.https("/tiny", 3)
            elif roll < 0.70:
                self.denied()
            elif roll < 0.85:
                self.plain()
            elif roll < 0.90:
                self.https("/bulk", BULK_BYTES)
            else:
                self.hostile(rng)
        except (OSError, ValueError) as exc:
            self.count("exceptions", False, repr(exc))


def idle_tunnels(load: Load, stop: threading.Event, size: int) -> None:
    """Keep `size` established TLS tunnels open and silent; replace them all every 30 s."""
    while not stop.is_set():
        tunnels = []
        for _ in range(size):
            try:
                sock, status = _connect(load.port, f"allowed.test:{load.tls_port}")
                tunnels.append(load.client_tls.wrap_socket(sock, server_hostname="allowed.test"))
                load.count("idle_tunnel", status == 200, str(status))
            except OSError as exc:
                load.count("idle_tunnel", False, repr(exc))
        stop.wait(30)
        for tls in tunnels:
            tls.close()


def policy_editor(policies: Path, stop: threading.Event, every_s: float, counts: Counter[str]) -> None:
    n = 0
    while not stop.wait(every_s):
        n += 1
        hosts = ", ".join(f"edit-{n}-{i}.test" for i in range(1 + n % 5))
        tmp = policies / ".edits.yaml.tmp"
        tmp.write_text(EDITED.format(n=n, hosts=hosts))
        tmp.replace(policies / "edits.yaml")
        counts["policy_edits"] += 1


# ---- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    operations: int


def flat(values: list[float], tolerance: float) -> bool:
    """No growth after warm-up: the median of the last quarter of the samples is within `tolerance` of the median of
    the first quarter (medians, so a sample taken while the idle tunnels are being replaced does not count)."""
    if len(values) < 2:
        return True
    quarter = max(1, len(values) // 4)
    return statistics.median(values[-quarter:]) - statistics.median(values[:quarter]) <= tolerance


def run(seconds: float, sample_every: float, workers: int, pace_s: float, idle: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="egress-soak-") as tmp:
        workdir = Path(tmp)
        cert, key = make_certificate(workdir)
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(cert, key)
        tls_origin, plain_origin = Origin(TLS_ORIGIN, server_tls), Origin(PLAIN_ORIGIN, None)
        gateway = GatewayUnderTest(workdir)
        load = Load(gateway.port, tls_origin.port, plain_origin.port, ssl.create_default_context(cafile=str(cert)))
        stop = threading.Event()
        started = time.monotonic()
        threads = [
            threading.Thread(target=idle_tunnels, args=(load, stop, idle), daemon=True),
            threading.Thread(target=policy_editor, args=(gateway.policies, stop, 3.0, load.counts), daemon=True),
        ]

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                load.step(rng)
                stop.wait(pace_s)

        threads += [threading.Thread(target=worker, args=(seed,), daemon=True) for seed in range(workers)]
        for thread in threads:
            thread.start()
        samples: list[Sample] = []
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                rss, fds = gateway.sample()
                samples.append(Sample(round(elapsed, 1), round(rss / 2**20, 1), fds, sum(load.counts.values())))
                time.sleep(min(sample_every, max(0.1, seconds - elapsed)))
            rss, fds = gateway.sample()
            samples.append(Sample(round(time.monotonic() - started, 1), round(rss / 2**20, 1), fds, 0))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=40)
            alive = gateway.process.poll() is None
            gateway.stop()
            tls_origin.shutdown()
            plain_origin.shutdown()
    warm_up = max(10.0, seconds * 0.2)
    steady = [s for s in samples if s.t_s >= warm_up] or samples[-1:]
    rss_values = [s.rss_mib for s in steady]
    fd_values = [float(s.fds) for s in steady]
    rss_tolerance = max(8.0, 0.1 * rss_values[0])
    errors = sum(v for k, v in load.counts.items() if k.endswith("_errors"))
    verdict = {
        "gateway_alive_at_end": alive,
        "errors": errors,
        "rss_flat": flat(rss_values, rss_tolerance),
        "fds_flat": flat(fd_values, 6.0),
        "rss_tolerance_mib": rss_tolerance,
    }
    verdict["ok"] = alive and errors == 0 and verdict["rss_flat"] and verdict["fds_flat"]
    return {
        "seconds": seconds,
        "warm_up_s": warm_up,
        "counts": dict(load.counts),
        "error_examples": load.errors[:10],
        "rss_mib": {"after_warm_up": rss_values[0], "max": max(rss_values), "end": rss_values[-1]},
        "fds": {"after_warm_up": int(fd_values[0]), "max": int(max(fd_values)), "end": int(fd_values[-1])},
        "verdict": verdict,
        "samples": [asdict(s) for s in samples],
    }


def markdown(result: dict[str, Any]) -> str:
    counts, rss, fds = result["counts"], result["rss_mib"], result["fds"]
    operations = sum(v for k, v in counts.items() if not k.endswith("_errors") and k != "policy_edits")
    return (
        "| duration | operations | policy edits | errors | RSS MiB after warm-up / max / end "
        "| fds after warm-up / max / end | flat |\n|---|---|---|---|---|---|---|\n"
        f"| {result['seconds'] / 60:.1f} min | {operations:,} | {counts.get('policy_edits', 0)} "
        f"| {result['verdict']['errors']} | {rss['after_warm_up']} / {rss['max']} / {rss['end']} "
        f"| {fds['after_warm_up']} / {fds['max']} / {fds['end']} | {'yes' if result['verdict']['ok'] else 'NO'} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes (the CI form runs ~45 s)")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pace", type=float, default=0.02, help="pause between one worker's operations, seconds")
    parser.add_argument("--idle-tunnels", type=int, default=20)
    parser.add_argument("--markdown", type=Path, help="also write the result as a markdown table row here")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    result = run(seconds, args.sample_every, args.workers, args.pace, args.idle_tunnels)
    print(json.dumps(result, indent=1))
    if args.markdown is not None:
        args.markdown.write_text(markdown(result))
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
