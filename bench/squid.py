"""Squid as the reference: an allowlisting CONNECT proxy that peeks at the ClientHello and splices on SNI.

Debian's `squid-openssl` package provides ssl_bump. Squid runs in the foreground (`-N`, one process plus its
logging daemon and certificate helpers, all counted by the CPU figures). Names resolve from a hosts file, and the
only DNS server is loopback, so nothing leaves the machine. Owns the Squid configuration and process.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.certs import CertFiles
from bench.procs import Server, wait_until

SQUID_CONF = """\
http_port 127.0.0.1:{port} ssl-bump tls-cert={cert} tls-key={key} generate-host-certificates=off
sslcrtd_program {certgen} -s {root}/ssl_db -M 4MB
sslcrtd_children 1 startup=1 idle=1
acl SSL_ports port 443
acl CONNECT method CONNECT
acl allowed_hosts dstdomain {hostname}
acl allowed_sni ssl::server_name {hostname}
acl step1 at_step SslBump1
http_access deny CONNECT !SSL_ports
http_access allow CONNECT allowed_hosts
http_access deny all
ssl_bump peek step1
ssl_bump splice allowed_sni
ssl_bump terminate all
hosts_file {root}/hosts
dns_nameservers 127.0.0.1
cache deny all
cache_mem 8 MB
access_log daemon:{root}/access.log squid
cache_log {root}/cache.log
cache_store_log none
pid_filename none
coredump_dir {root}
shutdown_lifetime 1 second
max_filedescriptors 16384
client_persistent_connections off
pinger_enable off
"""


@dataclass
class Squid:
    port: int
    server: Server

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()


def squid_binary() -> str | None:
    return shutil.which("squid") or (str(Path("/usr/sbin/squid")) if Path("/usr/sbin/squid").exists() else None)


def has_ssl_bump(squid: str) -> bool:
    version = subprocess.run([squid, "-v"], capture_output=True, text=True, timeout=10).stdout
    return "--with-openssl" in version


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_squid(root: Path, certs: CertFiles, hostname: str, address: str) -> Squid:
    squid = squid_binary()
    if squid is None:
        raise RuntimeError("squid is not installed (Debian: apt-get install squid-openssl)")
    if not has_ssl_bump(squid):
        raise RuntimeError(f"{squid} has no ssl_bump (built without OpenSSL); install squid-openssl")
    certgen = "/usr/lib/squid/security_file_certgen"
    root.mkdir(parents=True, exist_ok=True)
    for parent in (root, *root.parents):  # squid's user must reach its directory
        if parent == Path(tempfile.gettempdir()) or parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o755)
    (root / "hosts").write_text(f"{address} {hostname}\n")
    subprocess.run(
        [certgen, "-c", "-s", str(root / "ssl_db"), "-M", "4MB"], check=True, capture_output=True, timeout=30
    )
    if os.geteuid() == 0:  # squid drops to its own user; it must write its logs and read the helper db
        user = pwd.getpwnam("proxy")
        for dirpath, _dirs, files in os.walk(root):
            os.chown(dirpath, user.pw_uid, user.pw_gid)
            for name in files:
                os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)
    # Squid cannot listen on port 0; a race with another process taking the port is retried by the caller.
    port = _free_port()
    conf = root / "squid.conf"
    conf.write_text(
        SQUID_CONF.format(port=port, cert=certs.cert, key=certs.key, certgen=certgen, root=root, hostname=hostname)
    )
    checked = subprocess.run([squid, "-k", "parse", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    if checked.returncode != 0:
        raise RuntimeError(f"squid rejected its configuration:\n{checked.stderr[-2000:]}")
    server = Server.start("squid", [squid, "-N", "-f", str(conf)], root / "squid.out")

    def ready() -> bool:
        server.check_alive()
        return _accepts(port)

    wait_until(ready, 20, "squid to listen")
    return Squid(port, server)
