"""The StatusWriter against a real apiserver: a verdict lands only on the object version it was made for.

A verdict made for one object must never be written onto a newer version of it, or onto a different object
re-created under the same name (new uid, generation 1 again). The patch carries the resourceVersion the watch saw;
the server answers 409 to a stale one, and the writer drops the write (the watch brings the current object).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes.aio.client import CustomObjectsApi

from egress_gateway.kube.client import connect
from egress_gateway.kube.status import Acceptance, StatusWriter
from egress_gateway.settings import KubernetesSettings
from tests.kube.real.cluster import Cluster
from tests.kube.real.test_gateway import accepted, policy


def test_a_verdict_for_a_deleted_object_never_lands_on_its_namesake(
    clean_policies: Cluster, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    cluster = clean_policies
    ns = unique("status")
    cluster.namespace(ns)
    path = f"/apis/egressgateway.io/v1alpha1/namespaces/{ns}/egresspolicies/p"
    cluster.apply(policy(ns, "p", ["allowed.test"]))
    first = cluster.request("GET", path)
    cluster.request("DELETE", path)
    cluster.apply(policy(ns, "p", ["other.test"]))
    second = cluster.request("GET", path)
    assert second["metadata"]["uid"] != first["metadata"]["uid"] and second["metadata"]["generation"] == 1
    key = ("EgressPolicy", ns, "p")
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")

    async def scenario() -> tuple[int, int]:
        api = await connect(KubernetesSettings(kubeconfig=kubeconfig))
        writer = StatusWriter(CustomObjectsApi(api))
        writer.set_leader(True)
        task = asyncio.create_task(writer.run())
        try:
            stale = Acceptance(True, "Valid", "made for the first object", 1, rules=1)
            writer.observe(key, None, stale, first["metadata"]["resourceVersion"])
            await _until(lambda: writer.pending == 0)
            await asyncio.sleep(0.5)
            stale_writes = writer.writes
            current = Acceptance(False, "InvalidSpec", "made for the second object", 1)
            writer.observe(key, None, current, second["metadata"]["resourceVersion"])
            await _until(lambda: writer.writes > stale_writes)
            return stale_writes, writer.writes
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await api.close()

    stale_writes, writes = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert stale_writes == 0 and writes == 1
    condition = accepted(cluster, ns, "p")
    assert condition is not None and condition["message"] == "made for the second object"
    assert condition["uid"] == second["metadata"]["uid"]


async def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.05)
