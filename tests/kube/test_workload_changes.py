"""`WorkloadIndex` tells its subscribers which cluster identities changed: coalesced, and only for changes that
matter to an identity (pod labels, service account, IPs, pod gone, namespace labels)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from egress_gateway.kube.workloads import NOTIFY_INTERVAL_S, ClusterIdentity, IdentityChanges, WorkloadIndex
from egress_gateway.policy.decision import Identity
from egress_gateway.settings import KubernetesSettings
from tests.kube.conftest import eventually, kube_settings, namespace, pod, run
from tests.kube.fake_apiserver import FakeApiServer


def _index() -> tuple[WorkloadIndex, list[IdentityChanges]]:
    index = WorkloadIndex(KubernetesSettings())
    calls: list[IdentityChanges] = []
    index.subscribe(calls.append)
    return index, calls


async def _settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


def test_a_burst_of_changes_is_one_notification_and_the_next_waits_for_the_interval() -> None:
    async def scenario() -> None:
        index, calls = _index()
        for n in range(500):  # e.g. a rollout: 500 watch events handled in one loop iteration
            index._pod_event("ADDED", pod("shop", f"web-{n}", [f"10.2.{n // 250}.{n % 250}"], labels={"app": "web"}))
        assert calls == []  # nothing while the events are being applied
        await _settle()
        assert len(calls) == 1 and len(calls[0].pods) == 500
        first = time.monotonic()

        for n in range(100):  # more changes right after a notification: gathered, sent once after the interval
            index._pod_event("MODIFIED", pod("shop", f"web-{n}", [f"10.2.0.{n}"], labels={"app": "web", "v": "2"}))
        index._namespace_event("MODIFIED", namespace("shop", {"tier": "public"}))
        await _settle()
        assert len(calls) == 1
        await eventually(lambda: len(calls) == 2, timeout=2 * NOTIFY_INTERVAL_S + 1)
        took = time.monotonic() - first
        assert NOTIFY_INTERVAL_S * 0.8 <= took < NOTIFY_INTERVAL_S + 0.5, took
        assert len(calls[1].pods) == 100 and calls[1].namespaces == {"shop"}

        await asyncio.sleep(NOTIFY_INTERVAL_S + 0.05)  # quiet again: the next change goes out at once
        index._pod_event("DELETED", pod("shop", "web-7", []))
        started = time.monotonic()
        await eventually(lambda: len(calls) == 3, timeout=1)
        assert time.monotonic() - started < NOTIFY_INTERVAL_S / 2
        assert calls[2].pods == {("shop", "web-7")}
        await index.stop()

    run(scenario, timeout=20)


def test_status_only_updates_are_not_reported() -> None:
    async def scenario() -> None:
        index, calls = _index()
        index._namespace_event("ADDED", namespace("shop", {"team": "money"}))
        index._pod_event("ADDED", pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}, phase="Pending"))
        await _settle()
        assert len(calls) == 1
        await asyncio.sleep(NOTIFY_INTERVAL_S + 0.05)

        terminating = pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"})
        terminating["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
        quiet = [
            pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}, phase="Running"),  # phase
            terminating,  # deletion mark
            pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}),  # and back: same labels and IPs
        ]
        for raw in quiet:
            index._pod_event("MODIFIED", raw)
        index._namespace_event("MODIFIED", namespace("shop", {"team": "money"}))  # re-sent, same labels
        await asyncio.sleep(NOTIFY_INTERVAL_S + 0.1)
        assert len(calls) == 1, [c.pods for c in calls[1:]]

        index._pod_event("MODIFIED", pod("shop", "pay-1", ["10.1.0.6"], labels={"app": "payments"}))  # new IP
        await eventually(lambda: len(calls) == 2, timeout=1)
        await asyncio.sleep(NOTIFY_INTERVAL_S + 0.05)
        index._pod_event("MODIFIED", pod("shop", "pay-1", ["10.1.0.6"], labels={"app": "web"}))  # relabel
        await eventually(lambda: len(calls) == 3, timeout=1)
        assert calls[2].pods == {("shop", "pay-1")} and not calls[2].namespaces
        await index.stop()

    run(scenario, timeout=20)


def test_refresh_gives_the_current_identity_of_changed_cluster_pods_only() -> None:
    async def scenario() -> None:
        index, calls = _index()
        index._namespace_event("ADDED", namespace("shop"))
        index._pod_event("ADDED", pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}))
        index._pod_event("ADDED", pod("shop", "pay-2", ["10.1.0.6"], labels={"app": "payments"}))
        await _settle()
        pay1, pay2 = index.identity_for_pod("shop", "pay-1"), index.identity_for_pod("shop", "pay-2")
        assert isinstance(pay1, ClusterIdentity) and isinstance(pay2, ClusterIdentity)
        static = Identity(namespace="shop", pod="pay-1", labels={"app": "payments"})  # identity.static
        await asyncio.sleep(NOTIFY_INTERVAL_S + 0.05)

        index._pod_event("MODIFIED", pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "web"}))
        index._pod_event("MODIFIED", pod("shop", "pay-2", ["10.1.0.9"], labels={"app": "payments"}))  # IP only
        await eventually(lambda: len(calls) == 2, timeout=1)
        changes = calls[1]
        relabelled = changes.refresh(pay1)
        assert relabelled is not None and dict(relabelled.labels) == {"app": "web"}
        assert changes.refresh(pay2) is pay2  # same labels: the same object (nothing to re-decide)
        assert changes.refresh(static) is static  # static identities never change

        await asyncio.sleep(NOTIFY_INTERVAL_S + 0.05)
        index._pod_event("DELETED", pod("shop", "pay-1", []))
        index._namespace_event("MODIFIED", namespace("shop", {"tier": "public"}))
        await eventually(lambda: len(calls) == 3, timeout=1)
        assert calls[2].refresh(relabelled) is None  # its pod is gone
        moved = calls[2].refresh(pay2)
        assert moved is not None and moved.namespace_labels["tier"] == "public"
        await index.stop()

    run(scenario, timeout=20)


def test_a_relabel_in_the_api_server_is_reported_by_the_running_index(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    apiserver.put(namespace("shop"))
    apiserver.put(pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}))

    async def scenario() -> None:
        index = WorkloadIndex(kube_settings(kubeconfig).kubernetes)
        calls: list[IdentityChanges] = []
        index.subscribe(calls.append)
        await index.start()
        try:
            assert await index.wait_ready(5)
            await eventually(lambda: len(calls) >= 1, timeout=2)  # the initial list
            await asyncio.sleep(NOTIFY_INTERVAL_S + 0.1)
            listed = len(calls)
            apiserver.put(pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}, phase="Pending"))
            await asyncio.sleep(NOTIFY_INTERVAL_S + 0.2)
            assert len(calls) == listed  # status only
            apiserver.put(pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "web"}))
            await eventually(lambda: len(calls) == listed + 1, timeout=2)
            assert calls[-1].pods == {("shop", "pay-1")}
        finally:
            await index.stop()

    run(scenario)
