"""The file source: loads a directory, follows edits within a second, keeps the last good version of a bad file."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from egress_gateway.policy.decision import Facts, Identity, Reason
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.store import PolicyStore
from egress_gateway.sources.files import FilePolicySource, load_into_store, load_text

SHOP = Identity("shop", "p", MappingProxyType({"app": "payments"}))
PUBLIC = ipaddress.ip_address("93.184.216.10")

POLICY = """apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: p, namespace: shop}}
spec:
  rules:
    - name: r
      hosts: [{host}]
"""


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def _add(self, event: str, **kw: object) -> None:
        self.events.append((event, kw))

    info = warning = error = _add


def allowed(store: PolicyStore, host: str) -> bool:
    return Engine(policies=store.current).decide(Facts(SHOP, host, 443, destination_ip=PUBLIC)).allowed


async def wait_until(predicate, timeout: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_load_into_store_reads_yaml_and_yml_and_multi_document(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(host="a.example.com"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text(
        POLICY.format(host="b.example.com").replace("name: p,", "name: q,") + "---\n"
    )
    (tmp_path / ".hidden.yaml").write_text("garbage: [")
    store = PolicyStore()
    assert load_into_store([tmp_path], store) == []
    assert allowed(store, "a.example.com") and allowed(store, "b.example.com")
    assert store.loaded


def test_the_same_object_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POLICY.format(host="a.example.com"))
    (tmp_path / "b.yaml").write_text(POLICY.format(host="b.example.com"))
    errors = load_into_store([tmp_path], PolicyStore())
    assert len(errors) == 1 and "also defined in" in str(errors[0])


@pytest.mark.timeout(60)
def test_watch_applies_edits_within_a_second_and_keeps_last_good(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "shop.yaml"
        path.write_text(POLICY.format(host="a.example.com"))
        store = PolicyStore()
        log = RecordingLog()
        source = FilePolicySource(tmp_path, store, log, rescan_interval_s=30)
        await source.start()
        try:
            assert source.ready and allowed(store, "a.example.com")
            await asyncio.sleep(0.2)  # let the watcher settle

            path.write_text(POLICY.format(host="b.example.com"))
            took = await wait_until(lambda: allowed(store, "b.example.com"))
            assert took < 1.0, f"edit took {took:.2f}s to apply"
            assert not allowed(store, "a.example.com")

            path.write_text(POLICY.format(host="10.0.0.1"))  # invalid: IP in hosts
            await wait_until(lambda: any(e == "policy_rejected" for e, _ in log.events))
            rejected = next(kw for e, kw in log.events if e == "policy_rejected")
            assert rejected["field"] == "spec.rules[0].hosts[0]" and rejected["document"] == 0
            assert allowed(store, "b.example.com"), "last good version must stay in force"
            assert str(path) in source.errors

            path.unlink()
            await wait_until(lambda: not allowed(store, "b.example.com"))
            decision = Engine(policies=store.current).decide(Facts(SHOP, "b.example.com", 443, destination_ip=PUBLIC))
            assert decision.reason is Reason.NO_POLICY
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_missing_directory_is_not_ready(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = PolicyStore()
        source = FilePolicySource(tmp_path / "nope", store, RecordingLog(), rescan_interval_s=30)
        await source.sync()
        assert not source.ready and not store.loaded

    asyncio.run(scenario())


def test_a_directory_load_publishes_one_policy_set(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"p{i}.yaml").write_text(
            POLICY.format(host=f"h{i}.example.com").replace("name: p,", f"name: p{i},")
        )
    store = PolicyStore()
    published: list[int] = []
    store.subscribe(lambda policy_set: published.append(len(policy_set)))
    assert load_into_store([tmp_path], store) == []
    assert published == [5]


def test_the_file_source_accepts_both_api_versions(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text(POLICY.format(host="a.example.com"))
    (tmp_path / "new.yaml").write_text(
        POLICY.format(host="b.example.com").replace("v1alpha1", "v1alpha2").replace("name: p,", "name: q,")
    )
    (tmp_path / "cluster-old.yaml").write_text(
        "apiVersion: egressgateway.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: old}\n"
        "spec: {rules: [{name: c, hosts: [c.example.com]}]}\n"
    )
    store = PolicyStore()
    assert load_into_store([tmp_path], store) == []
    assert allowed(store, "a.example.com") and allowed(store, "b.example.com") and allowed(store, "c.example.com")
    versions = {p.source.api_version for p in store.current.policies}
    assert versions == {"egressgateway.io/v1alpha2"}  # what the engine sees is the storage version


@pytest.mark.parametrize("field", ["apiVersion", "kind", "metadata", "spec"])
@pytest.mark.parametrize("value", ["[80, 443]", "{a: 1}", "7", "null", "[[x]]"])
def test_a_top_level_field_of_any_yaml_type_is_a_field_error_not_a_crash(field: str, value: str) -> None:
    """Found by fuzz/fuzz_policy_loader.py: `kind: [80, 443]` raised TypeError (unhashable) in the loader."""
    document = {
        "apiVersion": "egressgateway.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": "{name: p, namespace: shop}",
        "spec": "{rules: [{name: r, hosts: [a.test]}]}",
    }
    document[field] = value
    result = load_text("".join(f"{key}: {text}\n" for key, text in document.items()), "bad.yaml")
    assert not result.objects
    assert result.errors and all(error.file == "bad.yaml" for error in result.errors)
    assert any(error.error.field.split(".")[0].split("[")[0] == field for error in result.errors), result.errors
