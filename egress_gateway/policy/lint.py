"""Lint warnings: policies that are valid but probably do not do what their author meant.

Owns: `lint_policies(policies, now=..., is_public_suffix=...) -> [LintWarning]`, one function per trap, each
naming the field it is about and how to fix it. Warnings never block a policy from loading (`lint --strict` makes
them fail CI). Pure: no I/O; the clock and the public-suffix list are arguments (the CLI passes the bundled list
of the `publicsuffixlist` package). Must not import the engine, sources, proxy or audit packages.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from egress_gateway.policy.hostnames import HostPattern, parse_host_pattern
from egress_gateway.policy.model import (
    NAMESPACE_NAME_LABEL,
    Action,
    ClusterEgressPolicy,
    LabelSelector,
    Mode,
    PolicyObject,
    Rule,
)
from egress_gateway.policy.selectors import compile_selector


class LintCode(StrEnum):
    EXPIRED_RULE = "expired_rule"
    PUBLIC_SUFFIX_WILDCARD = "public_suffix_wildcard"
    ONE_LABEL_WILDCARD = "one_label_wildcard"
    SHADOWED_RULE = "shadowed_rule"
    ALLOWS_NOTHING = "allows_nothing"
    DENY_ONLY_CLUSTER_POLICY = "deny_only_cluster_policy"


@dataclass(frozen=True, slots=True)
class LintWarning:
    code: LintCode
    policy_index: int  # position of the policy in the sequence given to `lint_policies`
    field: str  # e.g. spec.rules[2].hosts[0]
    message: str
    hint: str = ""


def describe(policy: PolicyObject) -> str:
    """`EgressPolicy shop/payments` or `ClusterEgressPolicy baseline`."""
    meta = policy.metadata
    return f"{policy.kind} {meta.namespace}/{meta.name}" if meta.namespace else f"{policy.kind} {meta.name}"


def _tier(policy: PolicyObject) -> str:
    """Where a policy is evaluated: `Admin`, `Namespace` or `Baseline`. Namespaced policies, and cluster policies
    without tiers (v1alpha1, read as the Namespace tier), are evaluated together in the Namespace tier."""
    return str(getattr(policy.spec, "tier", None) or "Namespace")


def _evaluation_order(policy: PolicyObject) -> tuple[int, int]:
    """Admin by priority, then the Namespace tier, then Baseline by priority (docs/policy-reference.md)."""
    tier = _tier(policy)
    priority = int(getattr(policy.spec, "priority", 0) or 0)
    return {"Admin": (0, priority), "Baseline": (2, priority)}.get(tier, (1, 0))


def _allows(rule: Rule) -> bool:
    return rule.action in (Action.ALLOW, Action.LOG)


def _expired(rule: Rule, now: float) -> bool:
    return rule.expires is not None and rule.expires.timestamp() <= now


# ---- expired rules -----------------------------------------------------------------------------------------------
def _expired_rules(index: int, policy: PolicyObject, now: float) -> Iterable[LintWarning]:
    for i, rule in enumerate(policy.spec.rules):
        if rule.expires is not None and _expired(rule, now):
            when = rule.expires.astimezone(UTC).isoformat().replace("+00:00", "Z")
            yield LintWarning(
                LintCode.EXPIRED_RULE,
                index,
                f"spec.rules[{i}].expires",
                f"rule `{rule.name}` expired at {when}; the gateway ignores it",
                "remove the rule, or move `expires` into the future if it is still needed",
            )


# ---- wildcards ---------------------------------------------------------------------------------------------------
def _wildcard_suffix(pattern: HostPattern) -> str | None:
    """The fixed part after the last wildcard label (`*.co.uk` -> `co.uk`), or None for exact names."""
    last = max((i for i, label in enumerate(pattern.labels) if label in ("*", "**")), default=None)
    return None if last is None else ".".join(pattern.labels[last + 1 :])


def _public_suffix_wildcards(
    index: int, policy: PolicyObject, is_public_suffix: Callable[[str], bool]
) -> Iterable[LintWarning]:
    for i, rule in enumerate(policy.spec.rules):
        for j, host in enumerate(rule.hosts or ()):
            suffix = _wildcard_suffix(parse_host_pattern(host))
            if suffix and is_public_suffix(suffix):
                yield LintWarning(
                    LintCode.PUBLIC_SUFFIX_WILDCARD,
                    index,
                    f"spec.rules[{i}].hosts[{j}]",
                    f"`{host}` (rule `{rule.name}`) spans `{suffix}`, a public suffix (Public Suffix List): "
                    f"names under it belong to different owners, so the wildcard admits all of them",
                    f"list the names you mean; keep the wildcard only if every name under `{suffix}` may be reached",
                )


def _one_label_wildcards(index: int, policy: PolicyObject, stated: Sequence[tuple[str, str]]) -> Iterable[LintWarning]:
    """`*.amazonaws.com` where stated names (other rules' hosts, names given to lint) are deeper than one label."""
    for i, rule in enumerate(policy.spec.rules):
        for j, host in enumerate(rule.hosts or ()):
            pattern = parse_host_pattern(host)
            if pattern.labels[0] != "*":
                continue
            suffix = pattern.labels[1:]
            deeper = _deeper_name(pattern, suffix, stated)
            if deeper is None:
                continue
            name, where = deeper
            yield LintWarning(
                LintCode.ONE_LABEL_WILDCARD,
                index,
                f"spec.rules[{i}].hosts[{j}]",
                f"`{host}` (rule `{rule.name}`) does not match {name} ({where}): `*` stands for exactly one label",
                f"write `**.{'.'.join(suffix)}` to match any depth (Smokescreen's `*.` matches any depth; "
                "here that is `**.`)",
            )


def _deeper_name(
    pattern: HostPattern, suffix: tuple[str, ...], stated: Sequence[tuple[str, str]]
) -> tuple[str, str] | None:
    for name, where in stated:
        labels = name.split(".")
        if len(labels) > len(pattern.labels) and _tail_matches(suffix, labels) and not pattern.matches(name):
            return name, where
    return None


def _tail_matches(suffix: Sequence[str], labels: Sequence[str]) -> bool:
    tail = labels[len(labels) - len(suffix) :]
    return all(s in ("*", label) for s, label in zip(suffix, tail, strict=True))


# ---- policies that allowlist nothing -----------------------------------------------------------------------------
def _allows_nothing(index: int, policy: PolicyObject) -> Iterable[LintWarning]:
    if any(_allows(rule) for rule in policy.spec.rules):
        return
    compiled = compile_selector(policy.spec.pod_selector)
    pods = "every pod" if compiled.selects_all else f"the pods labelled {compiled.describe()}"
    if isinstance(policy, ClusterEgressPolicy):
        if _tier(policy) != "Namespace":
            return  # Admin/Baseline tiers: what its Deny rules do not decide falls through to the next tier
        yield LintWarning(
            LintCode.DENY_ONLY_CLUSTER_POLICY,
            index,
            "spec.rules",
            f"{describe(policy)} has no Allow rule, yet it selects {pods} in the namespaces it matches: "
            "as a v1alpha1 (Namespace-tier) policy it makes every pod it selects deny-by-default, so those pods "
            "lose every destination no other policy allows (no_matching_rule), even under default_action Allow",
            "to deny a few destinations cluster-wide and leave the rest to each namespace, use apiVersion "
            "egressgateway.io/v1alpha2 (tiers), or add the Allow rules the selected pods need",
        )
        return
    yield LintWarning(
        LintCode.ALLOWS_NOTHING,
        index,
        "spec.rules",
        f"{describe(policy)} selects {pods} of its namespace but has no Allow rule: selecting a pod makes it "
        "deny-by-default, so it allowlists nothing and its pods lose every destination no other policy allows",
        "add Allow rules for what the pods need; to deny a few destinations for every namespace, use a "
        "ClusterEgressPolicy",
    )


# ---- shadowed rules ----------------------------------------------------------------------------------------------
def _label_covers(outer: str, inner: str) -> bool:
    return outer == inner or (outer == "*" and inner != "**")


def host_covers(outer: HostPattern, inner: HostPattern) -> bool:
    """Every name `inner` matches is matched by `outer`."""
    if outer.multi_label:
        suffix = outer.labels[1:]
        body = inner.labels[1:] if inner.multi_label else inner.labels
        if len(body) < len(suffix) or (not inner.multi_label and len(body) == len(suffix)):
            return False
        tail = body[len(body) - len(suffix) :]
        return all(_label_covers(o, i) for o, i in zip(suffix, tail, strict=True))
    if inner.multi_label or len(outer.labels) != len(inner.labels):
        return False
    return all(_label_covers(o, i) for o, i in zip(outer.labels, inner.labels, strict=True))


def _port_ranges(rule: Rule) -> list[tuple[int, int]] | None:
    if not rule.ports:
        return None
    out = []
    for port in rule.ports:
        low, _, high = str(port).partition("-")
        out.append((int(low), int(high or low)))
    return out


def _ports_cover(outer: Rule, inner: Rule) -> bool:
    outer_ports, inner_ports = _port_ranges(outer), _port_ranges(inner)
    if outer_ports is None:
        return True
    if inner_ports is None:
        return False
    return all(any(lo <= i_lo and i_hi <= hi for lo, hi in outer_ports) for i_lo, i_hi in inner_ports)


def rule_covers(deny: Rule, allow: Rule) -> bool:
    """Every destination `allow` matches is matched by `deny` (hosts, cidrs and ports; Deny excepts not modelled)."""
    if deny.except_ and allow.cidrs:
        return False
    outer_hosts = [parse_host_pattern(h) for h in deny.hosts or ()]
    hosts_ok = all(any(host_covers(o, parse_host_pattern(h)) for o in outer_hosts) for h in allow.hosts or ())
    outer_nets = [ipaddress.ip_network(c) for c in deny.cidrs or ()]
    cidrs_ok = all(
        any(n.version == o.version and n.subnet_of(o) for o in outer_nets)  # type: ignore[arg-type]
        for n in (ipaddress.ip_network(c) for c in allow.cidrs or ())
    )
    return hosts_ok and cidrs_ok and _ports_cover(deny, allow)


def _same_selector(a: LabelSelector | None, b: LabelSelector | None) -> bool:
    return compile_selector(a) == compile_selector(b)


def _selects_all_of(denying: PolicyObject, allowing: PolicyObject) -> bool:
    """Does `denying` select at least every pod `allowing` selects? (conservative: only sure cases say yes)"""
    if denying.spec.mode is not Mode.ENFORCE:
        return False
    if _evaluation_order(denying) > _evaluation_order(allowing):
        return False  # the Allow decides first (e.g. a namespaced Allow before a Baseline Deny)
    pods = compile_selector(denying.spec.pod_selector).selects_all or _same_selector(
        denying.spec.pod_selector, allowing.spec.pod_selector
    )
    if not pods:
        return False
    if isinstance(denying, ClusterEgressPolicy):
        namespaces = compile_selector(denying.spec.namespace_selector)
        if isinstance(allowing, ClusterEgressPolicy):
            return namespaces.selects_all or _same_selector(
                denying.spec.namespace_selector, allowing.spec.namespace_selector
            )
        namespace = allowing.metadata.namespace or ""
        return namespaces.matches({NAMESPACE_NAME_LABEL: namespace})
    return not isinstance(allowing, ClusterEgressPolicy) and denying.metadata.namespace == allowing.metadata.namespace


def _shadowed_rules(policies: Sequence[PolicyObject], now: float) -> Iterable[LintWarning]:
    for index, policy in enumerate(policies):
        for i, rule in enumerate(policy.spec.rules):
            if not _allows(rule) or _expired(rule, now):
                continue
            for other in policies:
                if not _selects_all_of(other, policy):
                    continue
                deny = next(
                    (
                        d
                        for d in other.spec.rules
                        if d.action is Action.DENY and not _expired(d, now) and rule_covers(d, rule)
                    ),
                    None,
                )
                if deny is None:
                    continue
                where = "of the same policy" if other is policy else f"of {describe(other)}"
                yield LintWarning(
                    LintCode.SHADOWED_RULE,
                    index,
                    f"spec.rules[{i}]",
                    f"{rule.action} rule `{rule.name}` never takes effect: Deny rule `{deny.name}` {where} "
                    "matches everything it matches for the same pods, and Deny wins",
                    f"remove `{rule.name}`, or narrow `{deny.name}`",
                )
                break


# ---- entry point -------------------------------------------------------------------------------------------------
def stated_names(policies: Sequence[PolicyObject], extra: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Exact names the policies (and the caller, e.g. names given on the command line) mention, with where."""
    out: list[tuple[str, str]] = [(name, "given to lint") for name in extra]
    for policy in policies:
        for rule in policy.spec.rules:
            for host in rule.hosts or ():
                if parse_host_pattern(host).is_exact:
                    out.append((host, f"rule `{rule.name}` of {describe(policy)}"))
    return out


def lint_policies(
    policies: Sequence[PolicyObject],
    *,
    now: float | None = None,
    is_public_suffix: Callable[[str], bool] = lambda _suffix: False,
    names: Iterable[str] = (),
) -> list[LintWarning]:
    """Every warning for a set of valid policies (the whole set: shadowing looks across policies)."""
    clock = datetime.now(UTC).timestamp() if now is None else now
    stated = stated_names(policies, names)
    warnings: list[LintWarning] = []
    for index, policy in enumerate(policies):
        warnings.extend(_expired_rules(index, policy, clock))
        warnings.extend(_public_suffix_wildcards(index, policy, is_public_suffix))
        warnings.extend(_one_label_wildcards(index, policy, stated))
        warnings.extend(_allows_nothing(index, policy))
    warnings.extend(_shadowed_rules(policies, clock))
    return sorted(warnings, key=lambda w: (w.policy_index, w.field, w.code))
