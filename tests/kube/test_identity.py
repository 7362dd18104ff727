"""Pod-IP and ServiceAccount-token identity against the fake API server (Pods, Namespaces, TokenReview)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from pathlib import Path

import pytest

from egress_gateway.identity.base import AuthenticationFailed, ChainResolver
from egress_gateway.identity.pods import PodIdentityResolver
from egress_gateway.identity.tokens import TokenIdentityResolver, token_expiry, token_from_header
from egress_gateway.policy.decision import Facts
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object
from egress_gateway.settings import Settings
from tests.kube.conftest import cluster_policy, eventually, fake_jwt, kube_settings, namespace, pod, run
from tests.kube.fake_apiserver import FakeApiServer

PUBLIC = ipaddress.ip_address("93.184.216.10")


def with_modes(settings: Settings, *modes: str, **identity: object) -> Settings:
    return Settings.model_validate(
        {**settings.model_dump(), "identity": {**settings.identity.model_dump(), "mode": list(modes), **identity}}
    )


def test_pod_ip_identity_carries_pod_and_namespace_labels(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(namespace("shop", {"team": "money"}))
    apiserver.put(pod("shop", "pay-1", ["10.1.0.5", "fd00::5"], labels={"app": "payments"}, service_account="pay"))
    apiserver.put(pod("shop", "node-agent", ["10.1.0.99"], host_network=True))
    apiserver.put(pod("shop", "done", ["10.1.0.7"], phase="Succeeded"))

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_modes(kube_settings(kubeconfig), "pod-ip"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            identity = await resolver.identify("10.1.0.5", None)
            assert identity is not None
            assert (identity.namespace, identity.pod, identity.service_account) == ("shop", "pay-1", "pay")
            assert dict(identity.labels) == {"app": "payments"}
            assert identity.namespace_labels["team"] == "money"
            assert identity.namespace_labels["kubernetes.io/metadata.name"] == "shop"
            assert await resolver.identify("fd00:0:0:0::5", None) == identity  # every pod IP, any spelling
            assert await resolver.identify("::ffff:10.1.0.5", None) == identity  # v4-mapped
            assert await resolver.identify("10.1.0.99", None) is None  # hostNetwork: the node's address
            assert await resolver.identify("10.1.0.7", None) is None  # finished
            assert await resolver.identify("10.1.0.250", None) is None  # nobody
            # the pod-list watch asks the server to drop finished pods
            watches = apiserver.requests_matching(lambda r: r.path == "/api/v1/pods")
            assert watches and all(
                r.query.get("fieldSelector") == "status.phase!=Succeeded,status.phase!=Failed" for r in watches
            )
            # a pod that finishes leaves the index (the server sends DELETED as it leaves the selection)
            apiserver.put(pod("shop", "pay-1", ["10.1.0.5"], labels={"app": "payments"}, phase="Succeeded"))
            await eventually(lambda: resolver.index.identity_for_ip("10.1.0.5") is None, 1)
        finally:
            await resolver.stop()

    run(scenario)


def test_pod_ip_reuse_newest_running_pod_owns_the_address(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(namespace("a"))
    apiserver.put(namespace("b"))
    apiserver.put(pod("a", "old", ["10.2.0.9"], created="2026-01-01T00:00:00Z"))

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_modes(kube_settings(kubeconfig), "pod-ip"))
        await resolver.start()
        index = resolver.index
        try:
            assert await index.wait_ready(5)
            assert index.identity_for_ip("10.2.0.9").pod == "old"  # type: ignore[union-attr]
            # the old pod is terminating; a new pod in another namespace got the same IP
            terminating = pod("a", "old", ["10.2.0.9"], created="2026-01-01T00:00:00Z")
            terminating["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
            apiserver.put(terminating)
            apiserver.put(pod("b", "new", ["10.2.0.9"], created="2026-01-02T00:00:01Z", phase="Pending"))
            await eventually(lambda: getattr(index.identity_for_ip("10.2.0.9"), "pod", None) == "new", 1)
            # two running claimants: the newest wins
            apiserver.put(pod("a", "old", ["10.2.0.9"], created="2026-01-01T00:00:00Z"))
            apiserver.put(pod("b", "new", ["10.2.0.9"], created="2026-01-02T00:00:01Z"))
            await eventually(lambda: index.identity_for_ip("10.2.0.9").namespace == "b", 1)  # type: ignore[union-attr]
            # the new pod goes away: the address falls back to the remaining claimant, then to nobody
            apiserver.delete("pods", "b", "new")
            await eventually(lambda: index.identity_for_ip("10.2.0.9").pod == "old", 1)  # type: ignore[union-attr]
            apiserver.delete("pods", "a", "old")
            await eventually(lambda: index.identity_for_ip("10.2.0.9") is None, 1)
        finally:
            await resolver.stop()

    run(scenario)


def test_namespace_label_change_moves_it_in_and_out_of_a_cluster_policy(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    apiserver.put(namespace("shop", {"tier": "internal"}))
    apiserver.put(pod("shop", "web-1", ["10.3.0.1"], labels={"app": "web"}))
    store = PolicyStore()
    store.upsert(validate_object(cluster_policy("public-tier", ["pypi.org"], {"tier": "public"})), "1")

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_modes(kube_settings(kubeconfig), "pod-ip"))
        await resolver.start()
        index = resolver.index

        def allowed() -> bool:
            identity = index.identity_for_ip("10.3.0.1")
            return (
                Engine(policies=store.current).decide(Facts(identity, "pypi.org", 443, destination_ip=PUBLIC)).allowed
            )

        try:
            assert await index.wait_ready(5)
            assert not allowed()
            apiserver.put(namespace("shop", {"tier": "public"}))
            assert await eventually(allowed, 1.0) < 1.0
            apiserver.put(namespace("shop", {"tier": "internal"}))
            assert await eventually(lambda: not allowed(), 1.0) < 1.0
        finally:
            await resolver.stop()

    run(scenario)


def test_pod_ip_resolver_knows_nobody_until_synced(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(pod("shop", "p", ["10.4.0.1"]))
    apiserver.go_down()

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_modes(kube_settings(kubeconfig), "pod-ip"))
        await resolver.start()
        try:
            assert not await resolver.index.wait_ready(0.5)
            assert await resolver.identify("10.4.0.1", None) is None
            apiserver.come_up()
            assert await resolver.index.wait_ready(5)
            assert (await resolver.identify("10.4.0.1", None)) is not None
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- tokens


def test_proxy_authorization_parsing() -> None:
    assert token_from_header("Bearer abc.def.ghi") == "abc.def.ghi"
    assert token_from_header("bearer   tok ") == "tok"
    basic = base64.b64encode(b"anything:the-token").decode()
    assert token_from_header(f"Basic {basic}") == "the-token"
    assert token_from_header("Basic !!!") is None
    assert token_from_header("Digest x") is None
    assert token_from_header(None) is None
    assert token_expiry(fake_jwt(1234567890)) == 1234567890
    assert token_expiry("opaque") is None


def _token_env(apiserver: FakeApiServer) -> None:
    apiserver.put(namespace("shop", {"team": "money"}))
    apiserver.put(pod("shop", "pay-1", ["10.5.0.1"], labels={"app": "payments"}, service_account="pay"))


def test_token_review_accepts_a_pod_bound_token_and_caches_until_expiry(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    _token_env(apiserver)
    exp = int(time.time()) + 3
    token = fake_jwt(exp, sub="system:serviceaccount:shop:pay")
    apiserver.add_review_token(
        token,
        username="system:serviceaccount:shop:pay",
        audiences=["egress-gateway"],
        exp=exp,
        extra={"authentication.kubernetes.io/pod-name": ["pay-1"]},
    )

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_modes(kube_settings(kubeconfig), "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            identity = await resolver.identify("10.9.9.9", f"Bearer {token}")
            assert identity is not None
            assert (identity.namespace, identity.pod) == ("shop", "pay-1")
            assert dict(identity.labels) == {"app": "payments"}
            assert identity.namespace_labels["team"] == "money"
            basic = base64.b64encode(f"x:{token}".encode()).decode()
            assert await resolver.identify("10.9.9.9", f"Basic {basic}") == identity
            assert resolver.reviews_made == 1  # cached
            reviews = apiserver.requests_matching(lambda r: r.path.endswith("/tokenreviews"))
            assert len(reviews) == 1
            # after the token's exp, the cache entry is gone and the token is refused without asking
            await asyncio.sleep(max(0.0, token_expiry(token) - time.time()) + 0.2)  # type: ignore[operator]
            with pytest.raises(AuthenticationFailed, match="expired"):
                await resolver.identify("10.9.9.9", f"Bearer {token}")
            assert resolver.reviews_made == 1
        finally:
            await resolver.stop()

    run(scenario)


def test_token_review_rejections_and_missing_tokens(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_env(apiserver)
    exp = time.time() + 600
    other_audience = fake_jwt(exp)
    apiserver.add_review_token(other_audience, username="system:serviceaccount:shop:pay", audiences=["vault"], exp=exp)
    user_token = fake_jwt(exp, sub="alice")
    apiserver.add_review_token(user_token, username="alice", audiences=["egress-gateway"], exp=exp)

    async def scenario() -> None:
        only_token = TokenIdentityResolver(with_modes(kube_settings(kubeconfig), "service-account-token"))
        await only_token.start()
        try:
            assert await only_token.index.wait_ready(5)
            with pytest.raises(AuthenticationFailed, match="malformed"):
                await only_token.identify("10.5.0.1", "Bearer not-a-real-token")
            with pytest.raises(AuthenticationFailed, match="invalid bearer token"):
                await only_token.identify("10.5.0.1", f"Bearer {fake_jwt(exp, n='unknown')}")
            with pytest.raises(AuthenticationFailed, match="audience"):
                await only_token.identify("10.5.0.1", f"Bearer {other_audience}")
            with pytest.raises(AuthenticationFailed, match="not a ServiceAccount"):
                await only_token.identify("10.5.0.1", f"Bearer {user_token}")
            with pytest.raises(AuthenticationFailed, match="proxy authentication required"):
                await only_token.identify("10.5.0.1", None)
            with pytest.raises(AuthenticationFailed, match="unsupported"):
                await only_token.identify("10.5.0.1", "Digest abc")
        finally:
            await only_token.stop()

    run(scenario)


def test_token_then_pod_ip_falls_back_when_no_token_is_sent(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_env(apiserver)

    async def scenario() -> None:
        settings = with_modes(kube_settings(kubeconfig), "service-account-token", "pod-ip")
        tokens, pods = TokenIdentityResolver(settings), PodIdentityResolver(settings)
        assert tokens.index is pods.index  # one pair of watches for both
        await tokens.start()
        await pods.start()
        chain = ChainResolver([tokens, pods])
        try:
            assert await pods.index.wait_ready(5)
            identity = await chain.identify("10.5.0.1", None)
            assert identity is not None and identity.pod == "pay-1"
            with pytest.raises(AuthenticationFailed):  # a token that is presented must be valid
                await chain.identify("10.5.0.1", "Bearer forged")
        finally:
            await tokens.stop()
            await pods.stop()

    run(scenario)


def test_token_cache_is_bounded(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_env(apiserver)
    exp = time.time() + 600
    tokens = [fake_jwt(exp, n=i) for i in range(3)]
    for token in tokens:
        apiserver.add_review_token(
            token, username="system:serviceaccount:shop:pay", audiences=["egress-gateway"], exp=exp
        )

    async def scenario() -> None:
        resolver = TokenIdentityResolver(
            with_modes(kube_settings(kubeconfig), "service-account-token", token_cache_size=2)
        )
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            for token in tokens:
                await resolver.identify("10.5.0.1", f"Bearer {token}")
            assert resolver.reviews_made == 3 and resolver.cached_approvals == 2
            await resolver.identify("10.5.0.1", f"Bearer {tokens[2]}")  # still cached
            await resolver.identify("10.5.0.1", f"Bearer {tokens[0]}")  # evicted: reviewed again
            assert resolver.reviews_made == 4
        finally:
            await resolver.stop()

    run(scenario)


def test_token_review_unreachable_fails_closed(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_env(apiserver)

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_modes(kube_settings(kubeconfig), "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            apiserver.go_down()
            with pytest.raises(AuthenticationFailed, match="cannot validate"):
                await resolver.identify("10.5.0.1", f"Bearer {fake_jwt(time.time() + 60)}")
        finally:
            await resolver.stop()

    run(scenario)


def test_concurrent_requests_with_one_token_make_one_review(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_env(apiserver)
    exp = time.time() + 600
    token = fake_jwt(exp, n="concurrent")
    apiserver.add_review_token(token, username="system:serviceaccount:shop:pay", audiences=["egress-gateway"], exp=exp)

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_modes(kube_settings(kubeconfig), "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            # one caller gives up half way; the others still get the answer
            impatient = asyncio.create_task(resolver.identify("10.5.0.1", f"Bearer {token}"))
            others = [asyncio.create_task(resolver.identify("10.5.0.1", f"Bearer {token}")) for _ in range(20)]
            await asyncio.sleep(0)
            impatient.cancel()
            identities = await asyncio.gather(*others)
            assert all(i is not None and i.namespace == "shop" for i in identities)
            assert resolver.reviews_made == 1
        finally:
            await resolver.stop()

    run(scenario)


def test_a_deleted_pods_token_is_refused_at_once_when_the_index_saw_the_deletion(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    _token_env(apiserver)
    stored = apiserver.get("pods", "shop", "pay-1")
    assert stored is not None
    exp = time.time() + 600
    token = fake_jwt(exp, n="bound")
    extra = {
        "authentication.kubernetes.io/pod-name": ["pay-1"],
        "authentication.kubernetes.io/pod-uid": [stored["metadata"]["uid"]],
    }
    apiserver.add_review_token(
        token, username="system:serviceaccount:shop:pay", audiences=["egress-gateway"], exp=exp, extra=extra
    )

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_modes(kube_settings(kubeconfig), "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            assert (await resolver.identify("10.5.0.1", f"Bearer {token}")).pod == "pay-1"  # type: ignore[union-attr]
            identity = await resolver.identify("10.5.0.1", f"Bearer {token}")
            assert identity is not None and identity.pod == "pay-1"
            assert identity.pod_uid == stored["metadata"]["uid"]  # a token identity carries the pod's UID too
            assert resolver.reviews_made == 1
            # The pod is deleted. TokenReview still says yes (kube-apiserver caches its verdicts for ~10 s, the
            # fake keeps the token): the index has seen the pod's UID go, which is enough.
            apiserver.delete("pods", "shop", "pay-1")
            await eventually(lambda: resolver.index.pod_gone(stored["metadata"]["uid"]), 2)
            with pytest.raises(AuthenticationFailed, match=r"bound to \(shop/pay-1\) was deleted"):
                await resolver.identify("10.5.0.1", f"Bearer {token}")
            assert resolver.reviews_made == 1 and resolver.cached_approvals == 0
        finally:
            await resolver.stop()

    run(scenario)


def test_the_namespace_of_a_source_address_is_known_at_accept_for_connection_shares(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    """`limits.namespace_connections` counts from accept: the pod index tells a source address's namespace before
    any request; a token-only chain cannot (the namespace is in the token), so the proxy counts at identification."""
    _token_env(apiserver)

    async def scenario() -> None:
        settings = with_modes(kube_settings(kubeconfig), "service-account-token", "pod-ip")
        tokens, pods = TokenIdentityResolver(settings), PodIdentityResolver(settings)
        await tokens.start()
        await pods.start()
        try:
            assert await pods.index.wait_ready(5)
            assert ChainResolver([tokens, pods]).namespace_of_address("10.5.0.1") == "shop"
            assert ChainResolver([tokens, pods]).namespace_of_address("10.5.0.250") is None
            assert ChainResolver([tokens]).namespace_of_address("10.5.0.1") is None
        finally:
            await tokens.stop()
            await pods.stop()

    run(scenario)
