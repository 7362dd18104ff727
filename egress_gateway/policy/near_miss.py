"""Near misses: the rules that almost decided a connection, and in one sentence each why they did not.

Owns: `near_misses(policies, facts, now)` (host matched but not the port; rule expired at T; the policy does not
select the client because of label X or its namespace; `*` is one label where the name is deeper),
`rule_matches_host`, `rule_matches_destination` and `selecting(policies, identity)`. Read-only over compiled
policies; the verdict stays the engine's. Pure: no I/O; the clock is an argument. Must not import sources, proxy, audit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from egress_gateway.policy.decision import Facts, Identity, IPAddress, PolicyRef
from egress_gateway.policy.engine import CompiledPolicy, CompiledRule, PolicySet
from egress_gateway.policy.errors import InvalidTarget
from egress_gateway.policy.hostnames import HostPattern
from egress_gateway.policy.model import NAMESPACE_NAME_LABEL, LabelSelectorOperator
from egress_gateway.policy.selectors import Selector
from egress_gateway.policy.targets import canonical_ip, normalize_host

MAX_NEAR_MISSES = 12


@dataclass(frozen=True, slots=True)
class NearMiss:
    policy: PolicyRef
    rule: str
    sentence: str


def selecting(policies: PolicySet, identity: Identity | None) -> tuple[PolicyRef, ...]:
    """Every policy that selects the client (namespaced first, then cluster), whatever its rules."""
    if identity is None:
        return ()
    return tuple(p.ref for p in policies.policies if p.selects(identity))


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


def _ports(rule: CompiledRule) -> str:
    ranges = rule.ports or ()
    texts = [str(r.low) if r.low == r.high else f"{r.low}-{r.high}" for r in ranges]
    return ("port " if len(texts) == 1 and "-" not in texts[0] else "ports ") + ", ".join(texts)


def _selector_miss(selector: Selector, labels: Mapping[str, str], what: str) -> str | None:
    """Why `selector` does not match `labels`, naming the first label that fails; None when it matches."""
    for key, wanted in selector.labels:
        actual = labels.get(key)
        if actual != wanted:
            have = f"has {key}={actual}" if actual is not None else f"has no label {key}"
            return f"the {what} {have}, the selector wants {key}={wanted}"
    for req in selector.requirements:
        if req.matches(labels):
            continue
        actual = labels.get(req.key)
        have = f"has {req.key}={actual}" if actual is not None else f"has no label {req.key}"
        values = ", ".join(sorted(req.values))
        wants = f"{req.key} {req.operator} ({values})" if values else f"{req.key} {req.operator}"
        if req.operator is LabelSelectorOperator.DOES_NOT_EXIST:
            have = f"has {req.key}={actual}"
        return f"the {what} {have}, the selector wants {wants}"
    return None


def _selection_miss(policy: CompiledPolicy, identity: Identity) -> str | None:
    if policy.namespace is not None and policy.namespace != identity.namespace:
        return f"it applies to namespace {policy.namespace} only (the client is in {identity.namespace})"
    if not policy.namespace_selector.selects_all:
        labels = {NAMESPACE_NAME_LABEL: identity.namespace, **identity.namespace_labels}
        why = _selector_miss(policy.namespace_selector, labels, "namespace")
        if why is not None:
            return why
    return _selector_miss(policy.pod_selector, identity.labels, "pod")


def _host_match(rule: CompiledRule, name: str | None, address: IPAddress | None) -> str | None:
    if name is not None:
        for pattern in rule.host_patterns:
            if pattern.matches(name):
                return pattern.text
    if address is not None:
        for network in rule.networks:
            if address.version == network.version and address in network and not rule.excepted(address):
                return str(network)
    return None


def rule_matches_host(rule: CompiledRule, name: str | None, address: IPAddress | None) -> bool:
    """The rule's hosts or cidrs cover this name or address (ports, action, expiry and selection aside)."""
    return _host_match(rule, name, address) is not None


def rule_matches_destination(rule: CompiledRule, name: str | None, address: IPAddress | None, port: int) -> bool:
    """The rule's hosts or cidrs and its ports cover this destination (whatever its action, expiry or selection)."""
    return rule.port_matches(port) and _host_match(rule, name, address) is not None


def _one_label_miss(rule: CompiledRule, name: str) -> HostPattern | None:
    for pattern in rule.host_patterns:
        if pattern.labels[0] == "*" and not pattern.matches(name):
            deeper = HostPattern(text="**." + ".".join(pattern.labels[1:]), labels=("**", *pattern.labels[1:]))
            if deeper.matches(name):
                return pattern
    return None


def near_misses(policies: PolicySet, facts: Facts, now: float) -> list[NearMiss]:
    """Rules whose host or CIDR covers the destination but that did not apply, and `*` wildcards one label short."""
    try:
        target = normalize_host(facts.target)
    except InvalidTarget:
        return []
    name = target.name
    address = canonical_ip(facts.destination_ip) if facts.destination_ip is not None else target.ip
    where = f"{name or address}:{facts.port}"
    out: list[NearMiss] = []
    for policy in policies.policies:
        unselected = _selection_miss(policy, facts.identity) if facts.identity is not None else None
        for rule in policy.rules:
            label = f"{rule.action} rule `{rule.name}` of {policy.ref}"
            matched = _host_match(rule, name, address)
            if matched is None:
                short = _one_label_miss(rule, name) if name is not None else None
                if short is not None and unselected is None:
                    suffix = ".".join(short.labels[1:])
                    sentence = (
                        f"{label} has `{short.text}`, which does not match {name}: `*` is exactly one label "
                        f"(`**.{suffix}` matches any depth)"
                    )
                    out.append(NearMiss(policy.ref, rule.name, sentence))
                continue
            port_miss = None if rule.port_matches(facts.port) else f"matches the host on {_ports(rule)} only"
            misses = []
            if not rule.active(now) and rule.expires_at is not None:
                misses.append(f"expired at {_when(rule.expires_at)}")
            if unselected is not None:
                misses.append(f"its policy does not select this client: {unselected}")
            if port_miss is not None:
                sentence = f"{label} {port_miss}" + (f", and {' and '.join(misses)}" if misses else "")
            elif misses:
                sentence = f"{label} matches {where} but {' and '.join(misses)}"
            else:
                continue
            out.append(NearMiss(policy.ref, rule.name, sentence))
    return out[:MAX_NEAR_MISSES]
