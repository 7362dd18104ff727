"""Fixtures for hardening tests: one gateway with tight limits and timeouts, a TLS and a plain origin, and helpers
to check a defined outcome (status or close, plus the decision record) and that the gateway still serves others.

Hostile clients use their own source address in 127.0.0.32/27 (namespace `hostile`), so each test finds its own
decision records by `client.address`; the well-behaved client is the payments pod 127.0.0.2 (namespace `shop`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.proxy.conftest import PAYMENTS_POD, STATIC_IDENTITIES, ca, curl, make_gateway, make_origin
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

__all__ = ["ca", "make_gateway", "make_origin"]  # fixtures shared with tests/proxy

TLS_ORIGIN = "127.0.0.10"
PLAIN_ORIGIN = "127.0.0.12"
BULK_ORIGIN = "127.0.0.13"  # sends without end (slow-reader tests)
BLACKHOLE_ORIGIN = "127.0.0.14"  # a listener whose accept queue is full: connects hang (connect timeout tests)
HRR_ORIGIN = "127.0.0.15"  # a recording shim in front of `openssl s_server` that answers with HelloRetryRequest
HOSTILE_CIDR = "127.0.0.32/27"

POLICIES = {
    "shop.yaml": """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  rules:
    - name: origins
      hosts: [allowed.test, plain.test]
""",
    "hostile.yaml": """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: hostile, namespace: hostile}
spec:
  rules:
    - name: origins
      hosts: [allowed.test, plain.test, "*.wild.test", bulk.test, blackhole.test]
    - name: no-denied
      action: Deny
      hosts: [denied.test]
    - name: hrr-origin
      hosts: [hrr.test]
    - name: opaque-tcp
      hosts: [tcp.test]
      protocols: [TCP]
""",
}

HOSTS = {
    "allowed.test": [TLS_ORIGIN],
    "denied.test": [TLS_ORIGIN],
    "x.wild.test": [TLS_ORIGIN],
    "plain.test": [PLAIN_ORIGIN],
    "bulk.test": [BULK_ORIGIN],
    "blackhole.test": [BLACKHOLE_ORIGIN],
    "hrr.test": [HRR_ORIGIN],
    "tcp.test": [PLAIN_ORIGIN],
}

IDENTITIES = [*STATIC_IDENTITIES, {"cidr": HOSTILE_CIDR, "namespace": "hostile", "pod": "attacker"}]

LIMITS = {"max_request_line_bytes": 2048, "max_header_bytes": 8192, "max_headers": 32}
TIMEOUTS = {"client_request_s": 3, "client_hello_s": 3, "connect_s": 3, "idle_s": 4}


def gateway_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": IDENTITIES},
        "resolver": {"hosts": HOSTS},
        "limits": dict(LIMITS),
        "timeouts": dict(TIMEOUTS),
    }
    config.update(overrides)
    return config


_sources = itertools.cycle(f"127.0.0.{n}" for n in range(33, 63))


def hostile_source() -> str:
    """A fresh 'attacker pod' address for one test (cycles through 127.0.0.33-62)."""
    return next(_sources)


@dataclass
class Env:
    gateway: GatewayProcess
    tls: OriginServer
    plain: OriginServer
    ca: TestCA
    _since: dict[str, int] = field(default_factory=dict)

    def fresh_source(self) -> str:
        """A hostile client address for one test; its records are looked up only from this moment on (the 30
        addresses are reused across tests)."""
        source = hostile_source()
        self._since[source] = len(self.gateway.events)
        return source

    def decisions(self, source: str) -> list[dict[str, Any]]:
        """The decision records (log lines) of `source` since `fresh_source` handed it out."""
        events = self.gateway.events[self._since.get(source, 0) :]
        return [e for e in events if e.get("event") == "egress_decision" and e.get("client.address") == source]

    def decision(self, source: str, reason: str, timeout: float = 10.0) -> dict[str, Any]:
        """The decision record of `source` with `reason`; fails if none appears within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.decisions(source):
                if record.get("egress.reason") == reason:
                    return record
            time.sleep(0.02)
        raise AssertionError(f"no {reason} decision for {source}; saw {self.decisions(source)}")

    def wait_decision(
        self, source: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.decisions(source):
                if predicate(record):
                    return record
            time.sleep(0.02)
        raise AssertionError(f"no matching decision for {source}; saw {self.decisions(source)}")

    def assert_still_serves(self) -> None:
        """A well-behaved client in another namespace still gets through, over TLS and plain HTTP."""
        result = curl(self.gateway, f"https://allowed.test:{self.tls.port}/still-serving", ca=self.ca)
        assert result.exit_code == 0 and result.status == 200, result.stderr
        plain = curl(self.gateway, f"http://plain.test:{self.plain.port}/still-serving", source=PAYMENTS_POD)
        assert plain.status == 200, plain.stderr
        assert self.gateway.process is not None and self.gateway.process.poll() is None


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("hardening")
    test_ca = TestCA(base / "ca")
    leaf = test_ca.issue("allowed.test", "denied.test", "*.wild.test", TLS_ORIGIN)
    tls = OriginServer(TLS_ORIGIN, leaf.server_context(), "tls").start()
    plain = OriginServer(PLAIN_ORIGIN, None, "plain").start()
    gateway = GatewayProcess(Path(base / "gw"), gateway_config(), POLICIES).start()
    try:
        yield Env(gateway, tls, plain, test_ca)
    finally:
        gateway.stop()
        tls.stop()
        plain.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def accepted_after(origin: OriginServer, before: int, settle: float = 0.3) -> int:
    time.sleep(settle)
    return origin.accepted - before
