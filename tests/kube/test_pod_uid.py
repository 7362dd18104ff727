"""Issue 16: a connection identified through the pod index carries its pod's UID (`k8s.pod.uid`), so a pod name
that is reused (a StatefulSet pod re-created, a Deployment pod name seen again) is not ambiguous in the trail."""

from __future__ import annotations

from typing import Any

from egress_gateway.audit.fields import K8S_POD_UID, identity_attributes
from egress_gateway.identity.pods import PodIdentityResolver
from egress_gateway.kube.workloads import WorkloadIndex
from egress_gateway.policy.decision import Identity
from egress_gateway.proxy.addon import GatewayAddon
from egress_gateway.settings import KubernetesSettings, Settings
from tests.kube.conftest import namespace, pod, run


def _pod(name: str, ip: str, uid: str) -> dict[str, Any]:
    raw = pod("shop", name, [ip], labels={"app": "db"})
    raw["metadata"]["uid"] = uid
    return raw


def test_a_pod_ip_identity_carries_the_pod_uid_and_a_recreated_pod_gets_the_new_one() -> None:
    async def scenario() -> None:
        index = WorkloadIndex(KubernetesSettings())
        index._namespace_event("ADDED", namespace("shop"))
        index._pod_event("ADDED", _pod("db-0", "10.3.0.7", "0b6f-first"))
        first = index.identity_for_ip("10.3.0.7")
        assert first is not None and first.pod == "db-0" and first.pod_uid == "0b6f-first"
        assert identity_attributes(first)[K8S_POD_UID] == "0b6f-first"

        # The StatefulSet re-creates db-0: same name, same labels, same address, a new UID.
        index._pod_event("DELETED", _pod("db-0", "10.3.0.7", "0b6f-first"))
        index._pod_event("ADDED", _pod("db-0", "10.3.0.7", "7c21-second"))
        second = index.identity_for_ip("10.3.0.7")
        assert second is not None and second.pod == "db-0" and second.pod_uid == "7c21-second"
        assert second != first  # so open tunnels of the old pod are re-decided, and records tell the two apart
        await index.stop()

    run(scenario, timeout=10)


def test_the_pod_ip_resolver_hands_out_the_uid() -> None:
    async def scenario() -> None:
        settings = Settings()
        index = WorkloadIndex(settings.kubernetes)
        index._namespace_event("ADDED", namespace("shop"))
        index._pod_event("ADDED", _pod("db-1", "10.3.0.8", "9d3e-only"))
        identity = await PodIdentityResolver(settings, index).identify("10.3.0.8", None)
        assert identity is not None and identity.pod == "db-1" and identity.pod_uid == "9d3e-only"
        await index.stop()

    run(scenario, timeout=10)


def test_a_tunnel_revoked_because_its_pod_was_recreated_says_so() -> None:
    before = Identity("shop", "db-0", service_account="db", pod_uid="0b6f-first")
    after = Identity("shop", "db-0", service_account="db", pod_uid="7c21-second")
    cause = GatewayAddon._reidentified_cause(before, after)
    assert cause.startswith("the client's pod shop/db-0 was re-created (UID 0b6f-first -> 7c21-second)")
