"""The Kubernetes policy source against the fake API server: list, watch, relist, failures, status, leadership."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from egress_gateway.policy.decision import Facts, Identity
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.store import PolicyStore
from egress_gateway.sources.kubernetes import KubernetesPolicySource
from tests.kube.conftest import cluster_policy, egress_policy, eventually, kube_settings, run
from tests.kube.fake_apiserver import FakeApiServer

PUBLIC = ipaddress.ip_address("93.184.216.10")
SHOP = Identity("shop", "p", MappingProxyType({}), MappingProxyType({"kubernetes.io/metadata.name": "shop"}))


def allowed(store: PolicyStore, host: str, identity: Identity = SHOP) -> bool:
    return Engine(policies=store.current).decide(Facts(identity, host, 443, destination_ip=PUBLIC)).allowed


def accepted(server: FakeApiServer, resource: str, namespace: str | None, name: str) -> dict | None:
    obj = server.get(resource, namespace, name)
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition["type"] == "Accepted":
            return condition
    return None


def status_patches(server: FakeApiServer, name: str) -> list:
    return server.requests_matching(lambda r: r.method == "PATCH" and r.path.endswith(f"/{name}/status"))


@contextlib.asynccontextmanager
async def started_source(
    kubeconfig: Path, **kubernetes: Any
) -> AsyncIterator[tuple[PolicyStore, KubernetesPolicySource]]:
    """A started Kubernetes policy source feeding a fresh store; stopped on the way out."""
    store = PolicyStore()
    source = KubernetesPolicySource(kube_settings(kubeconfig, **kubernetes), store)
    await source.start()
    try:
        yield store, source
    finally:
        await source.stop()


def test_initial_sync_loads_both_kinds_and_marks_the_store_loaded(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(egress_policy("shop", "web", ["api.example.com"]))
    apiserver.put(egress_policy("other", "web", ["other.example.com"]))
    apiserver.put(cluster_policy("everyone", ["pypi.org"]))

    async def scenario() -> None:
        store = PolicyStore()
        source = KubernetesPolicySource(kube_settings(kubeconfig, write_status=False), store)
        assert not source.ready and source.staleness_seconds() is None
        await source.start()
        try:
            assert await source.wait_ready(5)
            assert store.loaded
            assert store.keys() == {
                ("EgressPolicy", "shop", "web"),
                ("EgressPolicy", "other", "web"),
                ("ClusterEgressPolicy", None, "everyone"),
            }
            assert allowed(store, "api.example.com") and allowed(store, "pypi.org")
            assert not allowed(store, "other.example.com")
            assert source.staleness_seconds() is not None
        finally:
            await source.stop()

    run(scenario)


def test_list_is_paged_with_limit_and_continue(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    for i in range(1203):
        apiserver.put(egress_policy(f"ns{i % 7}", f"p{i}", [f"h{i}.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert await source.wait_ready(10)
            assert len(store.keys()) == 1203

    run(scenario)
    pages = apiserver.requests_matching(lambda r: r.path.endswith("/egresspolicies") and "watch" not in r.query)
    assert [r.query.get("limit") for r in pages] == ["500", "500", "500"]
    assert sum(1 for r in pages if r.query.get("continue")) == 2


def test_add_modify_delete_reach_the_store_within_one_second(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert await source.wait_ready(5)
            assert not allowed(store, "api.example.com")
            apiserver.put(egress_policy("shop", "web", ["api.example.com"]))
            assert await eventually(lambda: allowed(store, "api.example.com"), 1.0) < 1.0
            apiserver.put(egress_policy("shop", "web", ["new.example.com"]))
            await eventually(lambda: allowed(store, "new.example.com"), 1.0)
            assert not allowed(store, "api.example.com")
            assert store.get(("EgressPolicy", "shop", "web")).ref.version == "2"  # type: ignore[union-attr]
            apiserver.delete("egresspolicies", "shop", "web")
            await eventually(lambda: not allowed(store, "new.example.com"), 1.0)
            assert store.keys() == set()

    run(scenario)


def test_an_update_to_one_policy_recompiles_only_that_policy(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(egress_policy("shop", "a", ["a.example.com"]))
    apiserver.put(egress_policy("shop", "b", ["b.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert await source.wait_ready(5)
            before_b = store.get(("EgressPolicy", "shop", "b"))
            apiserver.put(egress_policy("shop", "a", ["a2.example.com"]))
            await eventually(lambda: allowed(store, "a2.example.com"), 1.0)
            assert store.get(("EgressPolicy", "shop", "b")) is before_b

    run(scenario)


def test_invalid_policy_is_reported_in_status_with_field_path_and_last_good_is_kept(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    apiserver.put(egress_policy("shop", "web", ["api.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig) as (store, source):
            assert await source.wait_ready(5)
            await eventually(
                lambda: (accepted(apiserver, "egresspolicies", "shop", "web") or {}).get("status") == "True", 8
            )
            good = apiserver.get("egresspolicies", "shop", "web")
            assert good is not None and good["status"]["observedGeneration"] == 1
            assert good["status"]["rules"] == 1

            broken = egress_policy("shop", "web", ["api.example.com", "bad host!"])
            apiserver.put(broken)
            await eventually(
                lambda: (accepted(apiserver, "egresspolicies", "shop", "web") or {}).get("status") == "False", 5
            )
            condition = accepted(apiserver, "egresspolicies", "shop", "web")
            assert condition is not None
            assert condition["reason"] == "InvalidSpec"
            assert "spec.rules[0].hosts[1]" in condition["message"]
            assert "generation 1" in condition["message"] and "stays in force" in condition["message"]
            assert condition["observedGeneration"] == 2
            assert apiserver.get("egresspolicies", "shop", "web")["status"]["observedGeneration"] == 2  # type: ignore[index]
            # last known good still enforced
            assert allowed(store, "api.example.com")
            assert store.get(("EgressPolicy", "shop", "web")).ref.version == "1"  # type: ignore[union-attr]

            # a never-valid object contributes nothing but still gets a status
            apiserver.put(egress_policy("shop", "never", ["*.*.bad..name"]))
            await eventually(lambda: accepted(apiserver, "egresspolicies", "shop", "never") is not None, 5)
            never = accepted(apiserver, "egresspolicies", "shop", "never")
            assert never is not None and never["status"] == "False"
            assert "nothing from this policy is in force" in never["message"]
            assert apiserver.get("egresspolicies", "shop", "never")["status"]["rules"] == 0  # type: ignore[index]
            assert store.get(("EgressPolicy", "shop", "never")) is None

            # status is written only when it changes: our own writes come back through the watch and stop there
            writes = len(status_patches(apiserver, "web"))
            apiserver.put({**broken, "metadata": {**broken["metadata"], "labels": {"touched": "yes"}}})  # same spec
            await asyncio.sleep(1.0)  # time for the event (and any write it would cause) to go round
            assert len(status_patches(apiserver, "web")) == writes == 2

            # fixed again -> Accepted=True, new generation in force
            apiserver.put(egress_policy("shop", "web", ["fixed.example.com"]))
            await eventually(lambda: allowed(store, "fixed.example.com"), 1.0)
            await eventually(
                lambda: (accepted(apiserver, "egresspolicies", "shop", "web") or {}).get("status") == "True", 5
            )

    run(scenario)


def test_410_gone_relists_and_reconciles_without_losing_or_duplicating(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    apiserver.put(egress_policy("shop", "stays", ["stays.example.com"]))
    apiserver.put(egress_policy("shop", "vanishes", ["vanishes.example.com"]))
    apiserver.put(egress_policy("shop", "changes", ["before.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert await source.wait_ready(5)
            await eventually(lambda: all(r.connected for r in source.reflectors.values()), 2)
            apiserver.go_down()
            # meanwhile, in the cluster: one deleted, one changed, one added, history compacted
            apiserver.delete("egresspolicies", "shop", "vanishes")
            apiserver.put(egress_policy("shop", "changes", ["after.example.com"]))
            apiserver.put(egress_policy("shop", "appears", ["appears.example.com"]))
            apiserver.compact()
            apiserver.come_up()
            reflector = source.reflectors["EgressPolicy"]
            await eventually(lambda: reflector.relists >= 1 and reflector.connected, 10)
            await eventually(lambda: allowed(store, "appears.example.com"), 2)
            assert store.keys() == {
                ("EgressPolicy", "shop", "stays"),
                ("EgressPolicy", "shop", "changes"),
                ("EgressPolicy", "shop", "appears"),
            }
            assert len(store.current) == 3
            assert allowed(store, "after.example.com") and not allowed(store, "before.example.com")
            assert not allowed(store, "vanishes.example.com")
            # and the watch goes on from the relist's resourceVersion
            apiserver.put(egress_policy("shop", "later", ["later.example.com"]))
            await eventually(lambda: allowed(store, "later.example.com"), 1.0)

    run(scenario)


def test_stream_cut_mid_event_rewatches_from_last_version_without_relist(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    apiserver.put(egress_policy("shop", "a", ["a.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert await source.wait_ready(5)
            reflector = source.reflectors["EgressPolicy"]
            await eventually(lambda: reflector.connected, 2)
            apiserver.cut_watches(mid_event=True)
            await eventually(lambda: reflector.watch_restarts >= 1, 2)
            apiserver.put(egress_policy("shop", "b", ["b.example.com"]))
            await eventually(lambda: allowed(store, "b.example.com"), 2)
            assert reflector.relists == 0
            assert allowed(store, "a.example.com")
            assert len(store.current) == 2

    run(scenario)


def test_api_server_down_at_start_means_not_ready_until_it_answers(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    apiserver.put(egress_policy("shop", "a", ["a.example.com"]))
    apiserver.go_down()

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert not await source.wait_ready(1.0)
            assert not store.loaded and source.staleness_seconds() is None
            assert source.watch_restarts >= 1
            apiserver.come_up()
            assert await source.wait_ready(5)
            assert store.loaded and allowed(store, "a.example.com")

    run(scenario)


def test_api_server_down_later_keeps_enforcing_stays_ready_and_shows_staleness(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    apiserver.put(egress_policy("shop", "a", ["a.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False) as (store, source):
            assert await source.wait_ready(5)
            await eventually(lambda: source.staleness_seconds() == 0.0, 2)
            await asyncio.sleep(1.5)  # idle but connected: still in sync
            apiserver.go_down()
            await eventually(lambda: not any(r.connected for r in source.reflectors.values()), 2)
            assert (source.staleness_seconds() or 0) < 1.0  # counted from the moment the streams broke
            await eventually(lambda: (source.staleness_seconds() or 0) > 1.0, 5)
            assert source.ready and store.loaded
            assert allowed(store, "a.example.com")
            restarts = source.watch_restarts
            await eventually(lambda: source.watch_restarts > restarts + 2, 5)  # retrying, with backoff
            apiserver.come_up()
            await eventually(lambda: source.staleness_seconds() == 0.0, 5)

    run(scenario)


def test_bookmarks_move_the_resource_version_and_server_timeouts_renew_quietly(
    apiserver: FakeApiServer, kubeconfig: Path
) -> None:
    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False, watch_timeout_s=1) as (store, source):
            assert await source.wait_ready(5)
            reflector = source.reflectors["ClusterEgressPolicy"]
            # unrelated writes advance the cluster's resourceVersion; a bookmark tells the watcher
            apiserver.put(egress_policy("shop", "x", ["x.example.com"]))
            target = str(apiserver.resource_version)
            await eventually(lambda: reflector.resource_version == target, 3)
            await eventually(
                lambda: (
                    len(
                        apiserver.requests_matching(
                            lambda r: r.path.endswith("/clusteregresspolicies") and r.query.get("watch") == "true"
                        )
                    )
                    >= 3
                ),
                8,
            )
            assert reflector.watch_restarts == 0 and reflector.relists == 0
            watches = apiserver.requests_matching(lambda r: r.query.get("watch") == "true")
            assert all(r.query.get("allowWatchBookmarks") == "true" for r in watches)
            assert all(1 <= int(r.query["timeoutSeconds"]) <= 2 for r in watches)
            apiserver.put(cluster_policy("late", ["late.example.com"]))
            await eventually(lambda: allowed(store, "late.example.com"), 1.0)

    run(scenario, timeout=60)


def test_two_gateways_one_status_writer(apiserver: FakeApiServer, tmp_path: Path) -> None:
    config_a = apiserver.kubeconfig(tmp_path / "a", token="gateway-a")
    config_b = apiserver.kubeconfig(tmp_path / "b", token="gateway-b")
    apiserver.put(egress_policy("shop", "bad", ["bad host!"]))
    for i in range(5):
        apiserver.put(egress_policy("shop", f"ok{i}", [f"ok{i}.example.com"]))

    async def scenario() -> None:
        stores = [PolicyStore(), PolicyStore()]
        sources = [
            KubernetesPolicySource(kube_settings(c), s) for c, s in zip((config_a, config_b), stores, strict=True)
        ]
        for source in sources:
            await source.start()
        try:
            for source in sources:
                assert await source.wait_ready(5)
            await eventually(lambda: sum(s.leader for s in sources) == 1, 8)
            await eventually(
                lambda: all(
                    accepted(apiserver, "egresspolicies", "shop", n) for n in ["bad", *[f"ok{i}" for i in range(5)]]
                ),
                8,
            )
            # both enforce, only one writes
            for store in stores:
                assert allowed(store, "ok3.example.com")
            writers = {r.token for r in apiserver.requests_matching(lambda r: r.method == "PATCH")}
            leader = next(s for s in sources if s.leader)
            assert len(writers) == 1
            lease = apiserver.get("leases", "egress-system", "egress-gateway-status")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == leader.election.identity  # type: ignore[union-attr]
            # the leader goes away; the other takes over and writes the next change
            await leader.stop()
            other = next(s for s in sources if s is not leader)
            await eventually(lambda: other.leader, 10)
            apiserver.put(egress_policy("shop", "bad", ["still bad!"]))
            await eventually(
                lambda: (
                    apiserver.get("egresspolicies", "shop", "bad")["status"]["observedGeneration"]  # type: ignore[index]
                    == 2
                ),
                5,
            )
            writers = {r.token for r in apiserver.requests_matching(lambda r: r.method == "PATCH")}
            assert len(writers) == 2
        finally:
            for source in sources:
                await source.stop()

    run(scenario, timeout=60)


def test_an_object_the_engine_cannot_compile_does_not_stall_the_others(
    apiserver: FakeApiServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import egress_gateway.policy.store as store_module

    real_compile = store_module.compile_policy

    def fragile_compile(policy, version):  # type: ignore[no-untyped-def]
        if policy.metadata.name.startswith("boom"):
            raise RuntimeError("simulated engine bug")
        return real_compile(policy, version)

    monkeypatch.setattr(store_module, "compile_policy", fragile_compile)
    apiserver.put(egress_policy("shop", "boom", ["boom.example.com"]))
    apiserver.put(egress_policy("shop", "ok", ["ok.example.com"]))

    async def scenario() -> None:
        async with started_source(kubeconfig) as (store, source):
            assert await source.wait_ready(5)
            assert allowed(store, "ok.example.com") and not allowed(store, "boom.example.com")
            apiserver.put(egress_policy("shop", "boom2", ["boom2.example.com"]))
            apiserver.put(egress_policy("shop", "ok2", ["ok2.example.com"]))
            await eventually(lambda: allowed(store, "ok2.example.com"), 1.0)
            assert source.reflectors["EgressPolicy"].watch_restarts == 0
            await eventually(lambda: accepted(apiserver, "egresspolicies", "shop", "boom2") is not None, 5)
            condition = accepted(apiserver, "egresspolicies", "shop", "boom2")
            assert condition is not None and condition["status"] == "False"
            assert "could not compile" in condition["message"] and condition["reason"] == "CompileFailed"

    run(scenario)


def test_lease_times_are_valid_micro_times_even_on_a_whole_second(
    apiserver: FakeApiServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    import egress_gateway.kube.leader as leader_module

    class WholeSecond(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def,override]
            return datetime(2026, 11, 26, 12, 0, 0, 0, tzinfo=UTC)

    monkeypatch.setattr(leader_module, "datetime", WholeSecond)

    async def scenario() -> None:
        source = KubernetesPolicySource(kube_settings(kubeconfig), PolicyStore())
        await source.start()
        try:
            await eventually(lambda: source.leader, 5)
            await asyncio.sleep(1.5)  # a renewal, which re-sends acquireTime as read back
            assert source.leader
        finally:
            await source.stop()

    run(scenario)
    lease = apiserver.get("leases", "egress-system", "egress-gateway-status")
    assert lease is not None and lease["spec"]["renewTime"].startswith("2026-11-26T12:00:00.000001")
    rejected = apiserver.requests_matching(lambda r: "/leases" in r.path and r.status == 400)
    assert rejected == []


def test_api_server_answering_500_to_list_and_watch_is_retried(apiserver: FakeApiServer, kubeconfig: Path) -> None:
    path = "/apis/egressgateway.io/v1alpha2/egresspolicies"
    apiserver.put(egress_policy("shop", "a", ["a.example.com"]))
    apiserver.fail_next[path] = 500  # the first list

    async def scenario() -> None:
        store = PolicyStore()
        source = KubernetesPolicySource(kube_settings(kubeconfig, write_status=False), store)
        await source.start()
        reflector = source.reflectors["EgressPolicy"]
        try:
            assert await source.wait_ready(5)
            assert reflector.watch_restarts >= 1 and allowed(store, "a.example.com")
            await eventually(lambda: reflector.connected, 2)
            apiserver.fail_next[path] = 500  # the next watch
            apiserver.cut_watches(mid_event=False)
            await eventually(lambda: reflector.watch_restarts >= 3, 5)  # the cut, then the 500
            apiserver.put(egress_policy("shop", "b", ["b.example.com"]))
            await eventually(lambda: allowed(store, "b.example.com"), 5)
            assert reflector.relists == 0
            statuses = [r.status for r in apiserver.requests_matching(lambda r: r.path == path)]
            assert statuses.count(500) == 2
        finally:
            await source.stop()

    run(scenario)


def test_api_server_that_accepts_but_never_answers_is_given_up_on_and_retried(
    apiserver: FakeApiServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import egress_gateway.kube.reflector as reflector_module

    monkeypatch.setattr(reflector_module, "LIST_TIMEOUT_S", 1.0)
    monkeypatch.setattr(reflector_module, "WATCH_TIMEOUT_MARGIN_S", 1.0)
    apiserver.put(egress_policy("shop", "a", ["a.example.com"]))
    apiserver.hang()

    async def scenario() -> None:
        async with started_source(kubeconfig, write_status=False, watch_timeout_s=1) as (store, source):
            assert not await source.wait_ready(2.5)  # the list hangs, times out, is retried
            assert source.watch_restarts >= 1 and not store.loaded
            apiserver.answer_again()
            assert await source.wait_ready(5)
            await eventually(lambda: source.staleness_seconds() == 0.0, 3)
            # later: streams end and every new request hangs
            apiserver.hang()
            apiserver.cut_watches(mid_event=False)
            await eventually(lambda: (source.staleness_seconds() or 0) > 2.0, 8)
            assert source.ready and allowed(store, "a.example.com")
            apiserver.answer_again()
            await eventually(lambda: source.staleness_seconds() == 0.0, 8)
            apiserver.put(egress_policy("shop", "b", ["b.example.com"]))
            await eventually(lambda: allowed(store, "b.example.com"), 2)

    run(scenario)
