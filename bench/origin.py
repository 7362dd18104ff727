"""The TLS origin: nginx from Debian on <address>:443 serving a tiny body (`/tiny`) and a 100 MB file (`/bulk`).

Port 443 on purpose: `hey` sends `host:port` as the SNI when the URL carries a port. Owns the nginx configuration
and its process; imports nothing from egress_gateway.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from bench.certs import CertFiles
from bench.procs import Server, wait_until

TINY_BODY = b"ok\n"
BULK_BYTES = 100 * 1024 * 1024

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    sendfile on;
    default_type application/octet-stream;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    server {{
        listen {address}:443 ssl;
        server_name {hostname};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root}/www;
        location = /tiny {{ }}
        location = /bulk {{ }}
    }}
}}
"""


@dataclass
class Origin:
    hostname: str
    address: str
    server: Server

    @property
    def tiny_url(self) -> str:
        return f"https://{self.hostname}/tiny"

    @property
    def bulk_url(self) -> str:
        return f"https://{self.hostname}/bulk"

    def stop(self) -> None:
        self.server.stop()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (str(Path("/usr/sbin/nginx")) if Path("/usr/sbin/nginx").exists() else None)


def port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def _accepts(address: str) -> bool:
    try:
        with socket.create_connection((address, 443), timeout=1):
            return True
    except OSError:
        return False


def start_origin(
    root: Path, certs: CertFiles, hostname: str, address: str, workers: int = 1, cpus: str | None = None
) -> Origin:
    nginx = nginx_binary()
    if nginx is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx)")
    if not port_free(address, 443):
        raise RuntimeError(f"{address}:443 is already in use; pick another --origin-address")
    www = root / "www"
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    www.mkdir(parents=True, exist_ok=True)
    (www / "tiny").write_bytes(TINY_BODY)
    with (www / "bulk").open("wb") as bulk:  # sparse: no disk I/O, nginx still reads and encrypts every byte
        bulk.truncate(BULK_BYTES)
    conf = root / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=workers, root=root, address=address, hostname=hostname, cert=certs.cert, key=certs.key
        )
    )
    os.chmod(root, 0o755)
    argv = [nginx, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    server = Server.start("nginx", argv, root / "nginx.out")

    def ready() -> bool:
        server.check_alive()
        return _accepts(address)

    wait_until(ready, 15, "nginx to listen on 443")
    return Origin(hostname, address, server)
