"""Policy sets for the benchmark, written as YAML files the way a user keeps them (several policies per file).

`realistic_set`: the load generator's namespace allows the origin among a dozen other rules, 50 other namespaces
carry two policies each, plus a cluster-wide baseline: about 1,000 rules, so the gateway's decision runs against
a populated engine. `bulk_set`: N one-rule-group policies for the reload measurements. Imports only yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

API_VERSION = "egressgateway.io/v1alpha1"
LOADGEN_NAMESPACE = "bench"
LOADGEN_LABELS = {"app": "loadgen"}


def _policy(namespace: str, name: str, rules: list[dict[str, Any]], selector: dict[str, str] | None = None) -> dict:
    spec: dict[str, Any] = {"rules": rules}
    if selector:
        spec["podSelector"] = {"matchLabels": selector}
    return {
        "apiVersion": API_VERSION,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def filler_rules(seed: int, count: int) -> list[dict[str, Any]]:
    """Rules in the shapes real policies use: exact names with ports, `*.` and `**.` wildcards, CIDRs."""
    rules: list[dict[str, Any]] = []
    for i in range(count):
        r = seed * 1000 + i
        kind = i % 4
        if kind == 0:
            rules.append({"name": f"api-{r}", "hosts": [f"api{r}.svc.example.com"], "ports": [443]})
        elif kind == 1:
            rules.append({"name": f"tenant-{r}", "hosts": [f"*.tenant{r}.example.net"], "ports": [443]})
        elif kind == 2:
            rules.append({"name": f"cdn-{r}", "hosts": [f"**.cdn{r}.example.org"], "ports": [443, "8000-8100"]})
        else:
            rules.append({"name": f"net-{r}", "cidrs": [f"198.{(r >> 8) % 256}.{r % 256}.0/24"], "ports": [443]})
    return rules


def allow_rule(name: str, host: str) -> dict[str, Any]:
    return {"name": name, "hosts": [host], "ports": [443]}


def realistic_set(origin_host: str) -> list[dict[str, Any]]:
    loadgen_rules = [allow_rule("origin", origin_host), *filler_rules(999, 12)]
    objects = [_policy(LOADGEN_NAMESPACE, "loadgen", loadgen_rules, LOADGEN_LABELS)]
    objects.append(_policy(LOADGEN_NAMESPACE, "shared-services", filler_rules(998, 10)))
    for ns in range(50):
        objects.append(_policy(f"team-{ns:03d}", "egress", filler_rules(ns * 2, 10)))
        objects.append(_policy(f"team-{ns:03d}", "vendors", filler_rules(ns * 2 + 1, 10), {"tier": "backend"}))
    objects.append(
        {
            "apiVersion": API_VERSION,
            "kind": "ClusterEgressPolicy",
            "metadata": {"name": "baseline"},
            "spec": {
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}
                    ]
                },
                "rules": [
                    {
                        "name": "deny-metadata",
                        "action": "Deny",
                        "hosts": ["metadata.google.internal"],
                        "cidrs": ["169.254.169.254/32"],
                    },
                    {"name": "mirror", "hosts": ["mirror.internal.example.com"], "ports": [80, 443]},
                ],
            },
        }
    )
    return objects


def bulk_set(count: int, origin_host: str) -> list[dict[str, Any]]:
    """`count` policies of 4 rules, 10 policies per namespace; the first allows the origin for the load generator."""
    objects = [_policy(LOADGEN_NAMESPACE, "loadgen", [allow_rule("origin", origin_host)], LOADGEN_LABELS)]
    for i in range(1, count):
        objects.append(_policy(f"team-{i // 10:05d}", f"p{i}", filler_rules(i, 4)))
    return objects


def write_policies(directory: Path, objects: list[dict[str, Any]], per_file: int = 100) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(objects), per_file):
        path = directory / f"policies-{start // per_file:05d}.yaml"
        path.write_text(yaml.safe_dump_all(objects[start : start + per_file], sort_keys=False))
        paths.append(path)
    return paths
