"""v1alpha1 and v1alpha2 on a real kube-apiserver v1.20.2 (no conversion webhook): what the documented conversion
says the server does (docs/policy-reference.md, "Versions") is what it does."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from egress_gateway.policy.model import Tier
from egress_gateway.policy.validation import validate_object
from tests.kube.real.cluster import ApiError, Cluster
from tests.kube.real.conftest import CRDS

CLUSTER_PATH = "/apis/egressgateway.io/{version}/clusteregresspolicies"


def cluster_policy(version: str, name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"egressgateway.io/{version}",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": name},
        "spec": {"rules": [{"name": "paste", "action": "Deny", "hosts": ["pastebin.com"]}], **spec},
    }


def read(cluster: Cluster, version: str, name: str) -> dict[str, Any]:
    return cluster.request("GET", f"{CLUSTER_PATH.format(version=version)}/{name}")


def test_a_v1alpha1_cluster_policy_is_stored_as_tier_namespace_and_read_by_the_gateway_so(
    clean_policies: Cluster, unique: Callable[[str], str]
) -> None:
    cluster = clean_policies
    legacy, current = unique("legacy"), unique("current")
    cluster.request("POST", CLUSTER_PATH.format(version="v1alpha1"), cluster_policy("v1alpha1", legacy))
    cluster.request("POST", CLUSTER_PATH.format(version="v1alpha2"), cluster_policy("v1alpha2", current))
    as_v2 = read(cluster, "v1alpha2", legacy)
    assert (as_v2["apiVersion"], as_v2["spec"]["tier"]) == ("egressgateway.io/v1alpha2", "Namespace")
    assert validate_object(as_v2).spec.tier is Tier.NAMESPACE  # type: ignore[union-attr]
    fresh = read(cluster, "v1alpha2", current)
    assert (fresh["spec"]["tier"], fresh["spec"]["priority"]) == ("Admin", 1000)


def test_an_admin_tier_object_cannot_be_written_back_through_v1alpha1(
    clean_policies: Cluster, unique: Callable[[str], str]
) -> None:
    cluster = clean_policies
    name = unique("admin")
    body = cluster_policy("v1alpha2", name, tier="Admin", priority=10)
    body["spec"]["rules"].append({"name": "exempt", "action": "Pass", "hosts": ["docs.example.com"]})
    cluster.request("POST", CLUSTER_PATH.format(version="v1alpha2"), body)
    as_v1 = read(cluster, "v1alpha1", name)
    with pytest.raises(ApiError) as refused:
        cluster.request("PUT", f"{CLUSTER_PATH.format(version='v1alpha1')}/{name}", as_v1)
    assert "spec.tier" in json.dumps(refused.value.body), refused.value.body
    assert read(cluster, "v1alpha2", name)["spec"]["tier"] == "Admin"  # unchanged


def test_kubectl_explain_describes_spec_and_rules(cluster: Cluster) -> None:
    for field in ("egresspolicy.spec", "egresspolicy.spec.rules", "clusteregresspolicy.spec.tier"):
        explained = cluster.kubectl("explain", field).stdout
        assert "<empty>" not in explained.split("FIELDS:")[0], explained


def test_objects_stored_as_v1alpha1_before_the_upgrade_read_as_tier_namespace(
    make_cluster: Callable[[int], Cluster],
) -> None:
    """The upgrade path: the old CRD (v1alpha1 only, no `tier`) stores an object; the new CRDs are applied; the
    object, still stored as v1alpha1, is defaulted with the v1alpha1 schema on read: tier Namespace, not Admin."""
    private = make_cluster(1)
    new = yaml.safe_load((CRDS / "clusteregresspolicies.egressgateway.io.yaml").read_text())
    old = copy.deepcopy(new)
    (legacy,) = [v for v in old["spec"]["versions"] if v["name"] == "v1alpha1"]
    legacy["storage"] = True
    del legacy["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tier"]
    old["spec"]["versions"] = [legacy]
    private.kubectl("delete", "crd", new["metadata"]["name"])
    private.kubectl("apply", "-f", "-", stdin=json.dumps(old))
    private.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", new["metadata"]["name"])
    private.request("POST", CLUSTER_PATH.format(version="v1alpha1"), cluster_policy("v1alpha1", "before-upgrade"))
    assert "tier" not in read(private, "v1alpha1", "before-upgrade")["spec"]
    private.kubectl("apply", "-f", str(CRDS / "clusteregresspolicies.egressgateway.io.yaml"))
    private.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", new["metadata"]["name"])
    as_v2 = read(private, "v1alpha2", "before-upgrade")
    assert (as_v2["apiVersion"], as_v2["spec"]["tier"]) == ("egressgateway.io/v1alpha2", "Namespace")
