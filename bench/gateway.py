"""The gateway as a user runs it: `python -O -m egress_gateway run --config FILE` in a subprocess.

Writes the config (files policy source, static identity for the load generator on 127.0.0.1, the origin's name in
`resolver.hosts`, loopback as the only nameserver, audit to a JSON-lines file, JSON log lines to a file) and waits
for `/readyz`. Owns nothing inside egress_gateway; talks to it only through its command line, config and sockets.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.policies import LOADGEN_LABELS, LOADGEN_NAMESPACE, realistic_set, write_policies
from bench.procs import Server, process_tree, wait_until

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    port: int
    admin_port: int
    server: Server
    config: Path
    policies: Path
    audit_file: Path

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def processes(self) -> int:
        return len(process_tree(self.server.pid))

    def stop(self) -> None:
        self.server.stop(timeout_s=15)


def gateway_config(
    root: Path,
    policies: Path,
    origin_host: str,
    origin_address: str,
    extra_hosts: list[str],
    port: int,
    admin_port: int,
    audit: bool = True,
    log_level: str = "info",
) -> dict[str, Any]:
    hosts = {name: [origin_address] for name in [origin_host, *extra_hosts]}
    return {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "policy_source": "files",
        "policies_path": str(policies),
        "default_action": "Deny",
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {
            "mode": ["static"],
            "static": [
                {"cidr": "127.0.0.1/32", "namespace": LOADGEN_NAMESPACE, "pod": "loadgen-0", "labels": LOADGEN_LABELS}
            ],
        },
        # Only loopback as a nameserver: a name missing from `hosts` fails locally instead of leaving the machine.
        "resolver": {"hosts": hosts, "nameservers": ["127.0.0.1"], "timeout_s": 2},
        "timeouts": {"connect_s": 10, "client_hello_s": 10, "idle_s": 600},
        "limits": {"max_connections": 10000},
        "audit": {"file": str(root / "audit.jsonl")} if audit else {},
        "log": {"level": log_level, "format": "json"},
        "shutdown_grace_s": 1,
    }


def readyz(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_gateway(
    root: Path,
    origin_host: str,
    origin_address: str,
    *,
    objects: list[dict[str, Any]] | None = None,
    extra_hosts: list[str] | None = None,
    ready_timeout_s: float = 60,
    cpus: str | None = None,
    audit: bool = True,
    log_level: str = "info",
) -> Gateway:
    root.mkdir(parents=True, exist_ok=True)
    policies = root / "policies"
    write_policies(policies, objects if objects is not None else realistic_set(origin_host))
    port, admin_port = free_port(), free_port()
    config = root / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            gateway_config(
                root,
                policies,
                origin_host,
                origin_address,
                extra_hosts or [],
                port,
                admin_port,
                audit,
                log_level,
            )
        )
    )
    argv = [sys.executable, "-O", "-m", "egress_gateway", "run", "--config", str(config)]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    # Let Python cache the -O bytecode (the environment may say PYTHONDONTWRITEBYTECODE): a deployed gateway does not
    # recompile mitmproxy and the OpenTelemetry SDK on every start.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    server = Server.start("gateway", argv, root / "gateway.log", env=env)
    gateway = Gateway(port, admin_port, server, config, policies, root / "audit.jsonl")

    def ready() -> bool:
        server.check_alive()
        return readyz(admin_port)

    try:
        wait_until(ready, ready_timeout_s, "the gateway's /readyz", interval_s=0.02)
    except Exception:
        gateway.stop()
        raise
    return gateway


def time_to_ready(
    root: Path, origin_host: str, origin_address: str, objects: list[dict[str, Any]], timeout_s: float = 300
) -> tuple[Gateway, float]:
    """Start a gateway on `objects` and return it with the seconds from exec to /readyz answering 200."""
    started = time.monotonic()
    gateway = start_gateway(
        root, origin_host, origin_address, objects=objects, ready_timeout_s=timeout_s, extra_hosts=["late.bench.test"]
    )
    return gateway, time.monotonic() - started
