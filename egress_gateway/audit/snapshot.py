"""What was in force: the trail's `policy` record (docs/audit.md, "Record types"), built whenever the policy set
changes, and the words for a change that re-decided connections. Pure: no I/O; must not import the proxy.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from egress_gateway.policy.engine import CompiledPolicy, PolicySet
    from egress_gateway.settings import Settings

POLICY_RECORD = "policy"


def _sha256(value: Any) -> str:
    return "sha256:" + hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def decision_config(settings: Settings) -> dict[str, Any]:
    """The configuration values a decision depends on (engine_config's inputs, identity and revocation)."""
    from egress_gateway.engine_config import engine_config

    engine = engine_config(settings)
    return {
        "default_action": str(settings.default_action.value),
        "allowed_ranges": [str(network) for network in engine.allowed_ranges],
        "own_addresses": sorted(str(address) for address in engine.own_addresses),
        "require_sni_match": engine.require_sni_match,
        "policy_source": settings.policy_source,
        "identity_mode": list(settings.identity.mode),
        "revoke_open_tunnels": settings.revoke_open_tunnels,
    }


def policy_annotations(policy: CompiledPolicy, keys: Sequence[str]) -> dict[str, str]:
    annotations = policy.source.metadata.annotations or {}
    return {key: annotations[key] for key in keys if key in annotations}


def policy_entry(policy: CompiledPolicy, annotation_keys: Sequence[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": policy.ref.kind,
        "namespace": policy.ref.namespace,
        "name": policy.ref.name,
        "version": policy.ref.version,
        "contentHash": _sha256(policy.source.model_dump(mode="json", exclude_none=True)),
        "mode": str(policy.mode.value),
        "tier": str(policy.tier.value),
    }
    annotations = policy_annotations(policy, annotation_keys)
    if annotations:
        entry["annotations"] = annotations
    return entry


def policy_changes(before: PolicySet | None, after: PolicySet) -> list[tuple[str, str | None, str | None]]:
    """(`Kind/namespace/name`, old version, new version) of every policy added (old None), removed (new None) or
    changed between two policy sets, sorted."""
    old = {str(p.ref): p.ref.version for p in before.policies} if before is not None else {}
    new = {str(p.ref): p.ref.version for p in after.policies}
    return [
        (ref, old.get(ref), new.get(ref)) for ref in sorted(old.keys() | new.keys()) if old.get(ref) != new.get(ref)
    ]


def describe_changes(changes: Sequence[tuple[str, str | None, str | None]]) -> str:
    """`EgressPolicy/shop/payments version 3 -> 4; ClusterEgressPolicy/break-glass added (version 1)`"""
    parts = []
    for ref, old, new in changes:
        if old is None:
            parts.append(f"{ref} added (version {new})")
        elif new is None:
            parts.append(f"{ref} removed (version {old})")
        else:
            parts.append(f"{ref} version {old} -> {new}")
    return "; ".join(parts) if parts else "the policy set was reloaded unchanged"


def policy_record(
    policies: PolicySet, config: Mapping[str, Any], annotation_keys: Sequence[str] = ()
) -> dict[str, Any]:
    entries = sorted(
        (policy_entry(p, annotation_keys) for p in policies.policies),
        key=lambda e: (e["kind"], e["namespace"] or "", e["name"]),
    )
    config_hash = _sha256(config)
    snapshot = _sha256({"policies": entries, "config": config_hash})[: len("sha256:") + 16]
    return {
        "recordType": POLICY_RECORD,
        "timeUnixNano": str(time.time_ns()),
        "snapshot": snapshot,
        "generation": policies.generation,
        "config": {"hash": config_hash, **config},
        "policies": entries,
    }
