"""Identity that cannot be borrowed (issue 18), against a real kube-apiserver v1.20.2 on etcd.

The resolvers run in this process against the real server (admin credentials: RBAC is test_gateway's topic); tokens
come from the TokenRequest API and are checked by the server's own TokenReview. No kubelet runs: pods are objects
whose IPs are set through the status subresource, and deletions use a zero grace period.
One test per attack: a spoofed name label, an outage longer than `max_staleness_s`, a deleted ServiceAccount, a
deleted pod, a token from the wrong address, a junk-token flood, two live pods claiming one address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from egress_gateway.identity.base import AuthenticationFailed, ChainResolver, IdentityUnavailable, TooManyReviews
from egress_gateway.identity.pods import PodIdentityResolver
from egress_gateway.identity.tokens import TokenIdentityResolver
from egress_gateway.policy.decision import Facts, Identity
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object
from egress_gateway.settings import Settings
from tests.kube.conftest import cluster_policy, eventually, fake_jwt, run
from tests.kube.real.cluster import ApiServer, Cluster

NAME = "kubernetes.io/metadata.name"
AUDIENCE = "egress-gateway"
PUBLIC = ipaddress.ip_address("93.184.216.10")


def settings_for(kubeconfig: Path, *modes: str, **identity: Any) -> Settings:
    return Settings(
        policy_source="kubernetes",
        kubernetes={"kubeconfig": kubeconfig, "backoff_max_s": 0.5, "watch_timeout_s": 30},
        identity={"mode": list(modes), **identity},
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def delete_now(cluster: Cluster, path: str, server: ApiServer | None = None) -> None:
    """Delete at once (grace period 0): no kubelet runs to finish a graceful pod deletion."""
    body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    cluster.request("DELETE", path, body, server=server)


def pod_through(cluster: Cluster, server: ApiServer, namespace: str, name: str, ip: str) -> None:
    """`cluster.pod`, through a chosen apiserver."""
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }
    cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods", body, server=server)
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
    cluster.request("PATCH", path, status, server=server, content_type="application/merge-patch+json")


def allowed(store: PolicyStore, identity: Identity | None) -> bool:
    return Engine(policies=store.current).decide(Facts(identity, "pypi.org", 443, destination_ip=PUBLIC)).allowed


# ---------------------------------------------------------------------------------------- 1


def test_a_spoofed_name_label_never_matches(cluster: Cluster, unique: Callable[[str], str], tmp_path: Path) -> None:
    victim, thief = unique("victim"), unique("thief")
    cluster.namespace(victim)
    cluster.namespace(thief, labels={NAME: victim})
    # The server stores the forged label as it is (v1.21+ would overwrite it): the gateway must not believe it.
    stored = cluster.request("GET", f"/api/v1/namespaces/{thief}")["metadata"]["labels"]
    assert stored[NAME] == victim
    cluster.pod(thief, "p", ["10.118.1.1"])
    cluster.pod(victim, "p", ["10.118.1.2"])
    store = PolicyStore()
    store.upsert(validate_object(cluster_policy("by-name", ["pypi.org"], {NAME: victim})), "1")

    async def scenario() -> None:
        resolver = PodIdentityResolver(settings_for(cluster.kubeconfig(tmp_path / "kc"), "pod-ip"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(30)
            identity = await resolver.identify("10.118.1.1", None)
            assert identity is not None and identity.namespace == thief
            assert identity.namespace_labels[NAME] == thief
            assert not allowed(store, identity)
            assert allowed(store, await resolver.identify("10.118.1.2", None))
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 2


def test_an_outage_longer_than_max_staleness_stops_serving_the_reassigned_ips_old_identity(
    make_cluster: Callable[[int], Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(2)
    watched, other = cluster.apiservers
    cluster.namespace("old")
    cluster.namespace("new")
    cluster.pod("old", "owner", ["10.118.2.1"])

    async def scenario() -> None:
        kubeconfig = cluster.kubeconfig(tmp_path / "kc", server=watched)
        resolver = PodIdentityResolver(settings_for(kubeconfig, "pod-ip", max_staleness_s=3.0))
        chain = ChainResolver([resolver])
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(30)
            assert (await chain.identify("10.118.2.1", None)).namespace == "old"  # type: ignore[union-attr]
            await eventually(lambda: metric("egress_gateway_pod_ip_identity_trusted") == 1.0, 10)
            # The outage: the watched apiserver's process is stopped. Through the other one, the address moves.
            await asyncio.to_thread(watched.stop)
            await asyncio.to_thread(delete_now, cluster, "/api/v1/namespaces/old/pods/owner", other)
            await asyncio.to_thread(pod_through, cluster, other, "new", "taker", "10.118.2.1")
            # Past max_staleness_s, the old identity is never served: unknown_client, saying why.
            await eventually(lambda: metric("egress_gateway_pod_ip_identity_trusted") == 0.0, 15)
            assert getattr(resolver.index.identity_for_ip("10.118.2.1"), "namespace", "") == "old"  # what it last saw
            with pytest.raises(IdentityUnavailable, match="out of touch with the API server"):
                await chain.identify("10.118.2.1", None)
            await asyncio.to_thread(watched.start)
            await eventually(lambda: metric("egress_gateway_pod_ip_identity_trusted") == 1.0, 30)
            moved = resolver.index.identity_for_ip
            await eventually(lambda: getattr(moved("10.118.2.1"), "namespace", "") == "new", 10)
            assert (await chain.identify("10.118.2.1", None)).namespace == "new"  # type: ignore[union-attr]
        finally:
            await resolver.stop()

    run(scenario, timeout=120)


# ---------------------------------------------------------------------------------------- 3, 4, 5


def _workload(cluster: Cluster, namespace: str, account: str, pod: str, ip: str) -> dict[str, Any]:
    cluster.namespace(namespace)
    try:
        cluster.service_account(namespace, account)
    except Exception as exc:  # already there (a second pod of the same account)
        if "409" not in str(exc):
            raise
    return cluster.pod(namespace, pod, [ip], service_account=account)


def test_a_deleted_service_accounts_token_is_refused_within_the_cached_approval_lifetime(
    cluster: Cluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    ns = unique("sa-gone")
    created = _workload(cluster, ns, "app", "app-1", "10.118.3.1")
    token = cluster.token(ns, "app", [AUDIENCE], pod=created)

    async def scenario() -> None:
        resolver = TokenIdentityResolver(
            settings_for(cluster.kubeconfig(tmp_path / "kc"), "service-account-token", token_cache_ttl_s=60)
        )
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(30)
            identity = await resolver.identify("10.118.3.1", f"Bearer {token}")
            assert identity is not None and (identity.namespace, identity.pod) == (ns, "app-1")
            await asyncio.to_thread(delete_now, cluster, f"/api/v1/namespaces/{ns}/serviceaccounts/app")
            deleted = time.monotonic()

            async def refused() -> bool:
                try:
                    await resolver.identify("10.118.3.1", f"Bearer {token}")
                except AuthenticationFailed as exc:
                    # refused by the gateway itself: the approval is cached for 60 s and would still say yes
                    assert f"ServiceAccount {ns}/app was deleted" in exc.reason
                    return True
                return False

            while not await refused():
                assert time.monotonic() - deleted < 10, "a deleted ServiceAccount's token still accepted after 10 s"
                await asyncio.sleep(0.1)
            assert time.monotonic() - deleted < 60  # well within token_cache_ttl_s
        finally:
            await resolver.stop()

    run(scenario)


def test_a_deleted_pods_token_is_refused_at_once_when_the_index_has_seen_the_deletion(
    cluster: Cluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    ns = unique("pod-gone")
    created = _workload(cluster, ns, "app", "app-1", "10.118.4.1")
    token = cluster.token(ns, "app", [AUDIENCE], pod=created)
    uid = created["metadata"]["uid"]

    async def scenario() -> None:
        resolver = TokenIdentityResolver(settings_for(cluster.kubeconfig(tmp_path / "kc"), "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(30)
            assert (await resolver.identify("10.118.4.1", f"Bearer {token}")).pod == "app-1"  # type: ignore[union-attr]
            reviews = resolver.reviews_made
            await asyncio.to_thread(delete_now, cluster, f"/api/v1/namespaces/{ns}/pods/app-1")
            await eventually(lambda: resolver.index.pod_gone(uid), 10)
            with pytest.raises(AuthenticationFailed, match="was deleted or has finished"):
                await resolver.identify("10.118.4.1", f"Bearer {token}")
            assert resolver.reviews_made == reviews  # refused locally, not by asking the server again
        finally:
            await resolver.stop()

    run(scenario)


def test_a_token_from_the_wrong_address_is_refused_with_binding_on(
    cluster: Cluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    ns = unique("bind")
    pod_a = _workload(cluster, ns, "app", "a", "10.118.5.1")
    _workload(cluster, ns, "app", "b", "10.118.5.2")
    token = cluster.token(ns, "app", [AUDIENCE], pod=pod_a)

    async def scenario() -> None:
        settings = settings_for(cluster.kubeconfig(tmp_path / "kc"), "service-account-token", "pod-ip")
        assert settings.identity.binds_tokens_to_pod_ip
        resolver = TokenIdentityResolver(settings)
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(30)
            assert (await resolver.identify("10.118.5.1", f"Bearer {token}")).pod == "a"  # type: ignore[union-attr]
            with pytest.raises(AuthenticationFailed, match=rf"sent from 10\.118\.5\.2 \(pod {ns}/b\)"):
                await resolver.identify("10.118.5.2", f"Bearer {token}")  # pod B, same ServiceAccount
            with pytest.raises(AuthenticationFailed, match="no known pod"):
                await resolver.identify("10.118.5.99", f"Bearer {token}")
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 6


def test_a_junk_token_flood_is_rate_limited_and_does_not_evict_approved_entries(
    cluster: Cluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    ns = unique("flood")
    created = _workload(cluster, ns, "app", "app-1", "10.118.6.1")
    token = cluster.token(ns, "app", [AUDIENCE], pod=created)

    async def scenario() -> None:
        settings = settings_for(
            cluster.kubeconfig(tmp_path / "kc"),
            "service-account-token",
            token_cache_size=1,
            token_rejection_cache_size=4,
            token_reviews_per_address={"per_second": 0.01, "burst": 5},  # no refill within the test
        )
        resolver = TokenIdentityResolver(settings)
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(30)
            await resolver.identify("10.118.6.1", f"Bearer {token}")
            reviews = resolver.reviews_made
            # The server accepts the valid token with whitespace inside it (its JOSE library strips whitespace), so
            # each such spelling would be a new cache key and a new review; the gateway refuses them locally.
            spelled = f"{token[:30]}\t{token[30:]}"
            review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"}
            answer = await asyncio.to_thread(
                cluster.request,
                "POST",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                {**review, "spec": {"token": spelled, "audiences": [AUDIENCE]}},
            )
            assert answer["status"].get("authenticated") is True
            for junk in (spelled, f"{token[:30]}\n{token[30:]}", f"{token}.x", f"{token}==", f"{token}%20"):
                with pytest.raises(AuthenticationFailed, match="malformed"):
                    await resolver.identify("10.118.6.66", f"Bearer {junk}")
            # 150 well-formed tokens the server never issued, from one address
            outcomes = {"rejected": 0, "limited": 0}
            for n in range(150):
                try:
                    await resolver.identify("10.118.6.66", f"Bearer {fake_jwt(time.time() + 600, junk=n)}")
                except TooManyReviews:
                    outcomes["limited"] += 1
                except AuthenticationFailed:
                    outcomes["rejected"] += 1
            assert outcomes == {"rejected": 5, "limited": 145}
            assert resolver.reviews_made - reviews == 5
            assert resolver.cached_approvals == 1 and resolver.cached_rejections == 4
            # the approved entry survived: no review for it, and its pod's address was never limited
            assert (await resolver.identify("10.118.6.1", f"Bearer {token}")).pod == "app-1"  # type: ignore[union-attr]
            assert resolver.reviews_made - reviews == 5
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 7


def test_the_latest_ip_claim_wins(cluster: Cluster, unique: Callable[[str], str], tmp_path: Path) -> None:
    ns = unique("claims")
    cluster.namespace(ns)
    # The real holder was created first but got its address last; the ghost (created later) still lists it.
    cluster.pod(ns, "holder", [], phase="Pending")
    cluster.pod(ns, "ghost", ["10.118.7.1"])

    async def scenario() -> None:
        resolver = PodIdentityResolver(settings_for(cluster.kubeconfig(tmp_path / "kc"), "pod-ip"))
        index = resolver.index
        await resolver.start()
        try:
            assert await index.wait_ready(30)
            assert index.identity_for_ip("10.118.7.1").pod == "ghost"  # type: ignore[union-attr]
            conflicts = metric("egress_gateway_pod_ip_conflicts_total")
            await asyncio.to_thread(cluster.set_pod_status, ns, "holder", ["10.118.7.1"])
            await eventually(lambda: getattr(index.identity_for_ip("10.118.7.1"), "pod", "") == "holder", 10)
            assert metric("egress_gateway_pod_ip_conflicts_total") == conflicts + 1
        finally:
            await resolver.stop()

    run(scenario)
