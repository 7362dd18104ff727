"""A watch gap on a real control plane: two kube-apiservers on one etcd, the gateway watching the first.

The first apiserver is stopped; through the second, policies are deleted, created, and deleted-then-re-created
under the same name with a different spec (a new object: new uid, generation 1 again). When the first comes back
its fresh watch cache cannot serve the gateway's old resourceVersion: 410 Gone, and the gateway relists. After the
relist the gateway must enforce exactly what is stored now, and the status it writes must describe the object that
exists now, not the one it remembered under the same name (issue 14, "the stale-after-relist bug").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.kube.real.cluster import Cluster
from tests.kube.real.test_gateway import (
    ENFORCED_WITHIN_S,
    accepted,
    connect_status,
    gateway_config,
    policy,
    poll_status,
    wait_until,
)
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA


def not_in_force(obj: dict[str, Any]) -> dict[str, Any]:
    """Valid for the server's schema, rejected by the gateway (an `except` outside the rule's cidrs)."""
    obj["spec"]["rules"][0].update({"cidrs": ["203.0.113.0/24"], "except": ["198.51.100.1/32"]})
    return obj


def test_after_a_410_relist_the_gateway_enforces_and_reports_the_objects_that_exist_now(
    make_cluster: Callable[[int], Cluster],
    tmp_path: Path,
    origin: tuple[OriginServer, TestCA],
    gateways: list[GatewayProcess],
) -> None:
    cluster = make_cluster(2)
    watched, other = cluster.apiservers
    server, _ = origin
    allowed, elsewhere, third, gone = (
        f"{host}:{server.port}" for host in ("allowed.test", "other.test", "third.test", "gone.test")
    )
    cluster.namespace("shop")
    cluster.namespace("egress-system")
    cluster.apply(
        policy("shop", "web", ["allowed.test"]),
        policy("shop", "strict", ["third.test"]),
        policy("shop", "gone", ["gone.test"]),
    )

    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", server=watched)  # admin: RBAC is another test's topic
    gateway = GatewayProcess(tmp_path / "gw", gateway_config(kubeconfig)).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=30)
    poll_status(gateway, allowed, 200)
    assert connect_status(gateway, third) == 200 and connect_status(gateway, gone) == 200
    assert connect_status(gateway, elsewhere) == 403
    before = {
        name: wait_until(lambda n=name: accepted(cluster, "shop", n), 15, f"status of {name}")
        for name in ("web", "strict")
    }
    assert all(c["status"] == "True" for c in before.values())

    watched.stop()
    gateway.wait_for("kube_watch_error", timeout=15)
    # The gap: `web` re-created allowing other.test only; `strict` re-created with a spec the gateway rejects;
    # `gone` deleted.
    cluster.kubectl("delete", "egp", "web", "strict", "gone", "-n", "shop", server=other)
    cluster.apply(policy("shop", "web", ["other.test"]), server=other)
    cluster.apply(not_in_force(policy("shop", "strict", ["third.test"])), server=other)
    after = {
        name: cluster.request(
            "GET", f"/apis/egressgateway.io/v1alpha1/namespaces/shop/egresspolicies/{name}", server=other
        )
        for name in ("web", "strict")
    }
    assert all(after[n]["metadata"]["uid"] != before[n]["uid"] for n in after)
    assert all(after[n]["metadata"]["generation"] == 1 for n in after)  # same generation as the old objects

    watched.start()
    gateway.wait_for("kube_watch_expired", timeout=30)
    started = time.monotonic()
    # `web` now allows other.test only; `strict` contributes nothing (its new version is invalid, and the old
    # object it replaced is gone, so nothing of it may stay in force).
    poll_status(gateway, allowed, 403, timeout=ENFORCED_WITHIN_S + 10)
    assert connect_status(gateway, elsewhere) == 200
    assert connect_status(gateway, third) == 403 and connect_status(gateway, gone) == 403
    condition = wait_until(
        lambda: (c := accepted(cluster, "shop", "strict")) and c["uid"] == after["strict"]["metadata"]["uid"] and c,
        15,
        "a status on the new `strict`",
    )
    assert condition["status"] == "False", condition
    assert "spec.rules[0].except[0]" in condition["message"]
    assert "nothing from this policy is in force" in condition["message"]
    web = wait_until(lambda: accepted(cluster, "shop", "web"), 15, "a status on the new `web`")
    assert web["status"] == "True" and web["uid"] == after["web"]["metadata"]["uid"]
    # Stays that way: the old versions never come back.
    time.sleep(1.0)
    assert connect_status(gateway, allowed) == 403 and connect_status(gateway, third) == 403
    assert (accepted(cluster, "shop", "strict") or {}).get("status") == "False"
    print(f"\nrelist applied {time.monotonic() - started:.2f} s after the watched apiserver came back")
