"""Fixtures for the Kubernetes tests: a fake API server on loopback, a kubeconfig for it, object builders."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_gateway.settings import Settings
from tests.kube.fake_apiserver import FakeApiServer

GV = "egressgateway.io/v1alpha2"


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    server = FakeApiServer(bookmark_interval_s=0.5).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(apiserver: FakeApiServer, tmp_path: Path) -> Path:
    return apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")


def kube_settings(kubeconfig: Path, **kubernetes: Any) -> Settings:
    """Settings for tests: fast leader election and backoff; anything can be overridden."""
    values: dict[str, Any] = {
        "kubeconfig": kubeconfig,
        "lease_namespace": "egress-system",
        "lease_duration_s": 3,
        "renew_deadline_s": 2,
        "retry_period_s": 1,
        "backoff_max_s": 0.5,
        "watch_timeout_s": 30,
    }
    values.update(kubernetes)
    return Settings(policy_source="kubernetes", kubernetes=values)


def egress_policy(namespace: str, name: str, hosts: list[str], *, action: str = "Allow", **spec: Any) -> dict:
    rule = {"name": "r1", "action": action, "hosts": hosts, "ports": [443]}
    return {
        "apiVersion": GV,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"rules": [rule], **spec},
    }


def cluster_policy(name: str, hosts: list[str], namespace_labels: dict[str, str] | None = None) -> dict:
    spec: dict[str, Any] = {"rules": [{"name": "r1", "hosts": hosts, "ports": [443]}]}
    if namespace_labels is not None:
        spec["namespaceSelector"] = {"matchLabels": namespace_labels}
    return {"apiVersion": GV, "kind": "ClusterEgressPolicy", "metadata": {"name": name}, "spec": spec}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
    }


def pod(
    namespace: str,
    name: str,
    ips: list[str],
    *,
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    host_network: bool = False,
    created: str = "2026-01-01T00:00:00Z",
    service_account: str = "default",
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}, "creationTimestamp": created},
        "spec": {"hostNetwork": host_network, "serviceAccountName": service_account, "nodeName": "node-1"},
        "status": {"phase": phase, "podIP": ips[0] if ips else None, "podIPs": [{"ip": ip} for ip in ips]},
    }


def fake_jwt(exp: float, **claims: Any) -> str:
    """A JWT-shaped token (the gateway reads `exp` from it; TokenReview, not the signature, decides validity)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part({'exp': int(exp), **claims})}.c2lnbmF0dXJl"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> float:
    """Poll until `predicate()` is true; returns the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start


def run(coro_factory: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro_factory()

    return asyncio.run(bounded())
