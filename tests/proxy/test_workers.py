"""`workers: 2`: two gateway processes accept on one socket under a supervisor that aggregates the admin endpoints,
forwards SIGTERM, and goes down (exit 1) if a worker dies."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.proxy.conftest import STATIC_IDENTITIES, connect, tls_through
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

ORIGIN = "127.0.0.40"


def policy(*hosts: str) -> str:
    return f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: payments, namespace: shop}}
spec:
  rules:
    - name: origins
      hosts: [{", ".join(hosts)}]
"""


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture
def origin(make_origin: Callable[..., OriginServer], ca: TestCA) -> OriginServer:
    return make_origin(ORIGIN, ca.issue("api.test").server_context(), "api")


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    config = {
        "workers": 2,
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"hosts": {"api.test": [ORIGIN], "other.test": [ORIGIN]}},
    }
    return make_gateway(config, {"shop.yaml": policy("api.test")})


def test_two_workers_serve_behind_one_address(gateway: GatewayProcess, origin: OriginServer, ca: TestCA) -> None:
    assert gateway.process is not None
    assert len(children(gateway.process.pid)) == 2
    for _ in range(10):
        tunnel = tls_through(connect(gateway.proxy_port, f"api.test:{origin.port}"), ca, "api.test")
        tunnel.sendall(b"GET /w HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n")
        assert tunnel.recv(65536).startswith(b"HTTP/1.1 200")
        tunnel.close()
    assert connect(gateway.proxy_port, "other.test:443").status == 403
    assert origin.accepted == 10


def test_admin_endpoints_aggregate_the_workers(gateway: GatewayProcess) -> None:
    with httpx.Client(timeout=10) as client:
        ready = client.get(f"{gateway.admin_url}/readyz")
        assert ready.status_code == 200 and "2 workers" in ready.text
        assert client.get(f"{gateway.admin_url}/healthz").status_code == 200
        metrics = client.get(f"{gateway.admin_url}/metrics").text
    assert 'worker="0"' in metrics and 'worker="1"' in metrics


def test_policy_edits_reach_every_worker(gateway: GatewayProcess, origin: OriginServer) -> None:
    gateway.write_policy("shop.yaml", policy("other.test"))
    # Each worker watches the files itself; an edit racing a watcher's start is caught by its periodic rescan (5 s).
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and len(gateway.find("policy_file_loaded")) < 4:
        time.sleep(0.05)
    assert len(gateway.find("policy_file_loaded")) >= 4  # initial load + the edit, in each worker
    assert all(connect(gateway.proxy_port, f"api.test:{origin.port}").status == 403 for _ in range(20))


def test_sigterm_drains_every_worker_and_exits_0(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    workers = children(gateway.process.pid)
    assert gateway.stop(signal.SIGTERM) == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)


def test_a_dead_worker_takes_the_gateway_down(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    victim = children(gateway.process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert gateway.process.wait(timeout=40) == 1
    gateway.wait_for("worker_exited")


def test_workers_do_not_outlive_a_killed_supervisor(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    workers = children(gateway.process.pid)
    gateway.process.kill()
    gateway.process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
