"""Fixtures for tests against a real kube-apiserver v1.20.2 on etcd 3.4 (see cluster.py).

- `cluster`: one control plane shared by the session, the chart's CRDs applied. Tests use their own namespaces and
  remove the policies they create (`clean_policies`), so a gateway started by one test sees nothing of another's.
- `make_cluster`: a private control plane for tests that stop and restart API servers.
Everything skips, with the reason, when the apiserver binary or etcd is missing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kube.real.cluster import Binaries, Cluster, find_binaries
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

REPO = Path(__file__).resolve().parents[3]
CRDS = REPO / "charts" / "egress-gateway" / "crds"
ORIGIN = "127.0.0.31"  # a TLS origin for allowed.test and other.test (the gateway's resolver maps names to it)
_names = itertools.count(1)


@pytest.fixture(scope="session")
def binaries() -> Binaries:
    found = find_binaries()
    if isinstance(found, str):
        if os.environ.get("CI") == "true":
            pytest.fail(found)  # CI builds the apiserver first (scripts/test): missing there is a failure
        pytest.skip(found)
    return found


def _start(binaries: Binaries, apiservers: int) -> Cluster:
    directory = Path(tempfile.mkdtemp(prefix="egw-kube-"))
    cluster = Cluster(binaries, directory)
    try:
        cluster.start(apiservers)
        cluster.kubectl("apply", "-f", str(CRDS))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    except BaseException:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster(binaries: Binaries) -> Iterator[Cluster]:
    started = _start(binaries, 1)
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.directory, ignore_errors=True)


@pytest.fixture
def make_cluster(binaries: Binaries) -> Iterator[Callable[[int], Cluster]]:
    made: list[Cluster] = []

    def make(apiservers: int = 1) -> Cluster:
        made.append(_start(binaries, apiservers))
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names no other test in this session uses (namespaces, hosts, Lease namespaces)."""
    return lambda prefix: f"{prefix}-{next(_names)}"


@pytest.fixture
def clean_policies(cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, with every policy deleted after the test."""
    yield cluster
    cluster.kubectl("delete", "egresspolicies", "--all", "--all-namespaces", "--wait=false", check=False)
    cluster.kubectl("delete", "clusteregresspolicies", "--all", "--wait=false", check=False)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[OriginServer, TestCA]]:
    ca = TestCA(tmp_path / "ca")
    server = OriginServer(ORIGIN, ca.issue("allowed.test", "other.test").server_context(), "tls").start()
    try:
        yield server, ca
    finally:
        server.stop()


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()
