"""Identity that cannot be borrowed (issue 18), against the fake API server: one test per attack.

Name-label spoofing, stale pod-IP identities during an API outage, revoked tokens, deleted pods' tokens, tokens
sent from another address, junk-token floods, and two live pods claiming one address. The same attacks run
against a real kube-apiserver in tests/kube/real/ where the harness is available.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from egress_gateway.identity.base import AuthenticationFailed, ChainResolver, IdentityUnavailable, TooManyReviews
from egress_gateway.identity.jwt import MalformedToken, parse_token
from egress_gateway.identity.pods import PodIdentityResolver
from egress_gateway.identity.review_limits import AddressRateLimiter
from egress_gateway.identity.static import StaticIdentityResolver
from egress_gateway.identity.tokens import TokenIdentityResolver
from egress_gateway.policy.decision import Facts, Identity
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object
from egress_gateway.settings import Settings, StaticIdentity
from tests.kube.conftest import cluster_policy, eventually, fake_jwt, kube_settings, namespace, pod, run
from tests.kube.fake_apiserver import FakeApiServer

PUBLIC = ipaddress.ip_address("93.184.216.10")
SA = "system:serviceaccount:shop:pay"
NAME = "kubernetes.io/metadata.name"


def with_identity(kubeconfig: Path, *modes: str, **identity: object) -> Settings:
    settings = kube_settings(kubeconfig)
    return Settings.model_validate(
        {**settings.model_dump(), "identity": {**settings.identity.model_dump(), "mode": list(modes), **identity}}
    )


def allowed(store: PolicyStore, identity: Identity | None) -> bool:
    return Engine(policies=store.current).decide(Facts(identity, "pypi.org", 443, destination_ip=PUBLIC)).allowed


def only_for_namespace_named(name: str) -> PolicyStore:
    store = PolicyStore()
    store.upsert(validate_object(cluster_policy("by-name", ["pypi.org"], {NAME: name})), "1")
    return store


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------- 1. namespace names


def test_a_stored_name_label_naming_another_namespace_never_matches(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    # API servers before v1.21 store a user-set kubernetes.io/metadata.name label as it is.
    apiserver.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "evil", "labels": {NAME: "shop"}}})
    apiserver.put(namespace("shop"))
    apiserver.put(pod("evil", "thief", ["10.6.0.1"]))
    apiserver.put(pod("shop", "web", ["10.6.0.2"]))
    store = only_for_namespace_named("shop")

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_identity(kubeconfig, "pod-ip"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            thief = await resolver.identify("10.6.0.1", None)
            assert thief is not None and thief.namespace_labels[NAME] == "evil"
            assert not allowed(store, thief)
            assert allowed(store, await resolver.identify("10.6.0.2", None))
            assert resolver.index.namespace_labels("evil")[NAME] == "evil"
        finally:
            await resolver.stop()

    run(scenario)


def test_static_identities_and_the_engine_keep_the_real_name() -> None:
    with pytest.raises(ValueError, match="name label is always the namespace's own name"):
        StaticIdentity(cidr="10.0.0.0/8", namespace="evil", namespace_labels={NAME: "shop"})
    resolver = StaticIdentityResolver([StaticIdentity(cidr="10.0.0.0/8", namespace="evil")])
    identity = resolver.lookup("10.1.2.3")
    assert identity is not None and identity.namespace_labels[NAME] == "evil"
    # Whatever an adapter hands the engine, the name label it matches is the identity's own namespace.
    forged = Identity(namespace="evil", namespace_labels={NAME: "shop"})
    assert not allowed(only_for_namespace_named("shop"), forged)
    assert allowed(only_for_namespace_named("evil"), forged)


# ---------------------------------------------------------------------------------------- 2. staleness


def test_pod_ip_identities_are_not_served_past_max_staleness(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(namespace("shop"))
    apiserver.put(pod("shop", "old-owner", ["10.7.0.1"]))

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_identity(kubeconfig, "pod-ip", max_staleness_s=1.0))
        chain = ChainResolver([resolver])
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            assert (await chain.identify("10.7.0.1", None)).pod == "old-owner"  # type: ignore[union-attr]
            await eventually(lambda: metric("egress_gateway_pod_ip_identity_trusted") == 1.0, 3)
            # The outage: watches are cut and nothing answers (go_down() alone would leave pooled keep-alive
            # connections answering); an address may now move to another pod without the index knowing.
            apiserver.hang()
            apiserver.cut_watches(mid_event=False)
            took = await eventually(lambda: metric("egress_gateway_pod_ip_identity_trusted") == 0.0, 5)
            assert took >= 0.5  # not before max_staleness_s (minus the time the watch took to notice)
            with pytest.raises(IdentityUnavailable, match="out of touch with the API server"):
                await chain.identify("10.7.0.1", None)
            apiserver.answer_again()
            await eventually(lambda: metric("egress_gateway_pod_ip_identity_trusted") == 1.0, 10)
            assert (await chain.identify("10.7.0.1", None)).pod == "old-owner"  # type: ignore[union-attr]
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 3. revocation


def _service_account(name: str, uid: str, secrets: list[str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": "shop", "uid": uid},
        "secrets": [{"name": s} for s in secrets or []],
    }


def _token_cluster(apiserver: FakeApiServer) -> None:
    apiserver.put(namespace("shop"))
    apiserver.put(pod("shop", "pay-1", ["10.5.0.1"], labels={"app": "payments"}, service_account="pay"))
    apiserver.put(pod("shop", "web-1", ["10.5.0.2"], labels={"app": "web"}, service_account="web"))
    apiserver.put(_service_account("pay", "sa-uid-pay", ["pay-token-abcde"]))


def _register(apiserver: FakeApiServer, token: str, *, bound: bool = True, sa_uid: str = "sa-uid-pay") -> None:
    stored = apiserver.get("pods", "shop", "pay-1")
    assert stored is not None
    extra = (
        {
            "authentication.kubernetes.io/pod-name": ["pay-1"],
            "authentication.kubernetes.io/pod-uid": [stored["metadata"]["uid"]],
        }
        if bound
        else {}
    )
    apiserver.add_review_token(
        token, username=SA, audiences=["egress-gateway"], exp=time.time() + 600, extra=extra, uid=sa_uid
    )


def test_approvals_are_cached_for_token_cache_ttl_s_only(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_cluster(apiserver)
    token = fake_jwt(time.time() + 3600, n="ttl")  # exp an hour away: the lifetime, not exp, bounds the cache
    _register(apiserver, token)

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_identity(kubeconfig, "service-account-token", token_cache_ttl_s=1.0))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            await resolver.identify("10.5.0.1", f"Bearer {token}")
            await resolver.identify("10.5.0.1", f"Bearer {token}")
            assert resolver.reviews_made == 1
            apiserver.remove_review_token(token)  # e.g. its Secret was deleted, and no watch of ours saw it
            await asyncio.sleep(1.2)
            with pytest.raises(AuthenticationFailed, match="invalid bearer token"):
                await resolver.identify("10.5.0.1", f"Bearer {token}")
            assert resolver.reviews_made == 2
        finally:
            await resolver.stop()

    run(scenario)


def test_a_deleted_service_accounts_token_is_refused_before_its_approval_expires(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    _token_cluster(apiserver)
    token = fake_jwt(time.time() + 600, n="sa")
    _register(apiserver, token)

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_identity(kubeconfig, "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            assert (await resolver.identify("10.5.0.1", f"Bearer {token}")).pod == "pay-1"  # type: ignore[union-attr]
            apiserver.delete("serviceaccounts", "shop", "pay")  # TokenReview (the fake) would still say yes
            await eventually(lambda: resolver.index.service_account_gone("sa-uid-pay"), 2)
            with pytest.raises(AuthenticationFailed, match="ServiceAccount shop/pay was deleted"):
                await resolver.identify("10.5.0.1", f"Bearer {token}")
            # re-created under the same name: a new UID, and the old account's tokens stay refused
            apiserver.put(_service_account("pay", "sa-uid-pay-2"))
            await eventually(lambda: resolver.index.service_account("shop", "pay") is not None, 2)
            with pytest.raises(AuthenticationFailed, match="ServiceAccount shop/pay was deleted"):
                await resolver.identify("10.5.0.1", f"Bearer {token}")
            assert resolver.reviews_made == 2  # the re-review after the refusal dropped the approval
        finally:
            await resolver.stop()

    run(scenario)


def test_a_legacy_tokens_secret_removed_from_its_service_account_is_refused(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    _token_cluster(apiserver)
    token = fake_jwt(time.time() + 600, **{"kubernetes.io/serviceaccount/secret.name": "pay-token-abcde"})
    _register(apiserver, token, bound=False)

    async def scenario() -> None:
        resolver = TokenIdentityResolver(with_identity(kubeconfig, "service-account-token"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            assert (await resolver.identify("10.5.0.1", f"Bearer {token}")).namespace == "shop"  # type: ignore[union-attr]
            # the Secret is deleted; the token controller removes it from the ServiceAccount (v1.20-v1.23)
            apiserver.put(_service_account("pay", "sa-uid-pay", []))
            await eventually(lambda: not resolver.index.service_account("shop", "pay").secrets, 2)  # type: ignore[union-attr]
            with pytest.raises(AuthenticationFailed, match="Secret shop/pay-token-abcde is no longer listed"):
                await resolver.identify("10.5.0.1", f"Bearer {token}")
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 5. binding


def test_a_token_is_accepted_only_from_its_pods_address_when_bound(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_cluster(apiserver)
    bound = fake_jwt(time.time() + 600, n="bound")
    _register(apiserver, bound)
    unbound = fake_jwt(time.time() + 600, n="unbound")
    _register(apiserver, unbound, bound=False)

    async def scenario() -> None:
        settings = with_identity(kubeconfig, "service-account-token", "pod-ip")
        assert settings.identity.binds_tokens_to_pod_ip  # on by default where pod-IP identity is configured
        resolver = TokenIdentityResolver(settings)
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            assert (await resolver.identify("10.5.0.1", f"Bearer {bound}")).pod == "pay-1"  # type: ignore[union-attr]
            with pytest.raises(AuthenticationFailed, match=r"sent from 10\.5\.0\.2 \(pod shop/web-1\)"):
                await resolver.identify("10.5.0.2", f"Bearer {bound}")
            with pytest.raises(AuthenticationFailed, match=r"sent from 10\.99\.0\.1 \(no known pod\)"):
                await resolver.identify("10.99.0.1", f"Bearer {bound}")
            # a token bound to no pod: only from a pod running as its ServiceAccount
            assert (await resolver.identify("10.5.0.1", f"Bearer {unbound}")).namespace == "shop"  # type: ignore[union-attr]
            with pytest.raises(AuthenticationFailed, match="ServiceAccount shop/pay"):
                await resolver.identify("10.5.0.2", f"Bearer {unbound}")
            assert resolver.reviews_made == 2  # refusals are local, the approvals stay cached
        finally:
            await resolver.stop()
        unbound_settings = with_identity(kubeconfig, "service-account-token", "pod-ip", bind_token_to_pod_ip=False)
        anywhere = TokenIdentityResolver(unbound_settings)
        await anywhere.start()
        try:
            assert await anywhere.index.wait_ready(5)
            assert (await anywhere.identify("10.99.0.1", f"Bearer {bound}")).pod == "pay-1"  # type: ignore[union-attr]
        finally:
            await anywhere.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 6. junk tokens


def test_only_well_formed_jwts_are_accepted_and_each_has_one_canonical_form() -> None:
    token = fake_jwt(time.time() + 600, n="canonical")
    assert parse_token(token).canonical == token
    header, payload, signature = token.split(".")
    for junk in (
        f"{token} ",
        f"{token}\n",
        f"{token}\r\n",
        f"{token}.",
        f"{token}.x",
        f"{token}=",
        f"{header}.{payload}.{signature}==",
        f"{header}. {payload}.{signature}",
        f"{header}.{payload}",
        "not-a-jwt",
        "a.b.c",  # decodes to non-JSON
        f"{base64.urlsafe_b64encode(b'[1]').decode().rstrip('=')}.{payload}.{signature}",  # header not an object
        f"{base64.urlsafe_b64encode(b'{"alg":"none"}').decode().rstrip('=')}.{payload}.{signature}",
        f"{header}.{payload}.",
        "x" * 20_000,
    ):
        with pytest.raises(MalformedToken):
            parse_token(junk)
    # Unused trailing bits in the last character decode to the same bytes: one canonical form, one cache key.
    # ("c2lnbmF0dXJl" is "signature"; 'l' and 'k' differ only in bits that 9 bytes of signature do not use.)
    signature_bytes = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    variant = f"{header}.{payload}.{signature[:-1]}{'k' if signature[-1] == 'l' else signature[-1]}"
    if base64.urlsafe_b64decode(variant.split(".")[2] + "==") == signature_bytes and variant != token:
        assert parse_token(variant).cache_key == parse_token(token).cache_key


_TOKEN_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=. \t\n%+/"
_SEGMENT_TEXT = st.text(alphabet=_TOKEN_CHARACTERS, max_size=40)
_CLAIMS = st.dictionaries(st.text(max_size=5).filter(lambda k: k != "exp"), st.integers(), max_size=3)


@settings(max_examples=300, deadline=None)
@given(prefix=_SEGMENT_TEXT, suffix=_SEGMENT_TEXT, claims=_CLAIMS)
def test_parse_token_refuses_or_returns_a_canonical_fixed_point(prefix: str, suffix: str, claims: dict) -> None:
    """Any text is either refused with MalformedToken or has a canonical form that parses to itself."""
    for text in (prefix + fake_jwt(time.time() + 60, **claims) + suffix, prefix + suffix):
        try:
            parsed = parse_token(text)
        except MalformedToken:
            continue
        assert parse_token(parsed.canonical).canonical == parsed.canonical
        assert parse_token(parsed.canonical).cache_key == parsed.cache_key


def test_review_rate_per_address() -> None:
    now = [0.0]
    limiter = AddressRateLimiter(per_second=1.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("10.0.0.1") == pytest.approx(1.0)
    assert limiter.acquire("10.0.0.2") == 0.0  # another address has its own bucket
    now[0] = 1.0
    assert limiter.acquire("10.0.0.1") == 0.0
    assert AddressRateLimiter(per_second=0, burst=1).acquire("x") == 0.0  # 0 = unlimited


def test_a_junk_token_flood_is_rate_limited_and_evicts_no_approval(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    _token_cluster(apiserver)
    good = fake_jwt(time.time() + 600, n="good")
    _register(apiserver, good)

    async def scenario() -> None:
        settings = with_identity(
            kubeconfig,
            "service-account-token",
            token_cache_size=1,
            token_rejection_cache_size=2,
            token_reviews_per_address={"per_second": 0.01, "burst": 5},  # no refill within the test
        )
        resolver = TokenIdentityResolver(settings)
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            await resolver.identify("10.5.0.1", f"Bearer {good}")
            reviews_before = resolver.reviews_made
            # a valid token with junk appended or inserted: refused locally, no review, no new cache key
            for junk in (f"{good}.junk", f"{good}==", f"{good[:20]} {good[20:]}", f"{good}%00"):
                with pytest.raises(AuthenticationFailed, match="malformed"):
                    await resolver.identify("10.66.0.1", f"Bearer {junk}")
            # whitespace around a header value is not part of it: the same token, the same cache entry
            await resolver.identify("10.5.0.1", f"Bearer  {good} ")
            assert resolver.reviews_made == reviews_before
            # 150 distinct, well-formed, unknown tokens from one address: 5 reviews, then 429s
            limited = 0
            for n in range(150):
                try:
                    await resolver.identify("10.66.0.1", f"Bearer {fake_jwt(time.time() + 600, junk=n)}")
                except TooManyReviews as exc:
                    limited += 1
                    assert exc.retry_after_s > 0
                except AuthenticationFailed as exc:
                    assert "invalid bearer token" in exc.reason
            assert resolver.reviews_made - reviews_before == 5 and limited == 145
            assert resolver.cached_rejections == 2 and resolver.cached_approvals == 1
            # the approved token is still cached: no review, and its own address is not limited
            await resolver.identify("10.5.0.1", f"Bearer {good}")
            assert resolver.reviews_made - reviews_before == 5
        finally:
            await resolver.stop()

    run(scenario)


# ---------------------------------------------------------------------------------------- 7. IP claims


def test_the_most_recent_claim_of_an_address_wins_and_is_counted(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(namespace("a"))
    apiserver.put(namespace("b"))
    # The ghost (a pod on a lost node) was created later than the pod that really holds the address now.
    apiserver.put(pod("a", "ghost", ["10.8.0.1"], created="2026-01-02T00:00:00Z"))

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_identity(kubeconfig, "pod-ip"))
        index = resolver.index
        await resolver.start()
        try:
            assert await index.wait_ready(5)
            conflicts = metric("egress_gateway_pod_ip_conflicts_total")
            apiserver.put(pod("b", "holder", ["10.8.0.1"], created="2026-01-01T00:00:00Z"))
            await eventually(lambda: getattr(index.identity_for_ip("10.8.0.1"), "pod", None) == "holder", 2)
            assert metric("egress_gateway_pod_ip_conflicts_total") == conflicts + 1
            # an update of the ghost that does not change its addresses does not take the address back
            apiserver.put(pod("a", "ghost", ["10.8.0.1"], labels={"x": "y"}, created="2026-01-02T00:00:00Z"))
            await asyncio.sleep(0.3)
            assert index.identity_for_ip("10.8.0.1").pod == "holder"  # type: ignore[union-attr]
        finally:
            await resolver.stop()

    run(scenario)


def test_claims_found_in_one_list_are_ordered_by_pod_start_time(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(namespace("a"))
    ghost = pod("a", "ghost", ["10.8.0.2"], created="2026-01-02T00:00:00Z")
    ghost["status"]["startTime"] = "2026-01-02T00:00:01Z"
    holder = pod("a", "holder", ["10.8.0.2"], created="2026-01-01T00:00:00Z")
    holder["status"]["startTime"] = "2026-01-03T00:00:00Z"  # Pending for a day, then got the address
    apiserver.put(holder)
    apiserver.put(ghost)

    async def scenario() -> None:
        resolver = PodIdentityResolver(with_identity(kubeconfig, "pod-ip"))
        await resolver.start()
        try:
            assert await resolver.index.wait_ready(5)
            assert resolver.index.identity_for_ip("10.8.0.2").pod == "holder"  # type: ignore[union-attr]
        finally:
            await resolver.stop()

    run(scenario)
