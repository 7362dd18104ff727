"""`audit --suggest-policy`: EgressPolicies a security engineer can merge, from what a namespace was seen using.

From the trail's allowed flows of one namespace (Audit-mode would-deny flows are allowed flows too), build one
policy per workload selector (the pods' `app.kubernetes.io/name`, `app` or `k8s-app` label, or the `--pod-label`
selector given), with one rule per rule name and port set: names under `hosts`, IP literals under `cidrs` as /32 or
/128. Never suggested: what a Deny rule denies (the recorded Audit-mode verdict, or the engine's decision under the
policies in force when the caller passes an engine: any tier, so a Baseline Deny counts as soon as the engine knows
tiers), and names the trail saw resolve to blocked or private addresses. A flow allowed by a rule of this
namespace keeps that rule's name, and so does a destination an in-force rule covers on other ports (the suggestion
extends it). Names are collapsed into `*.parent` only when asked, with a warning saying what the wildcard newly
admits. Every policy is validated with the same `validate_object` that `lint` uses before it is printed. Imports the
policy core and `trail`/`replay`; no I/O besides what the caller does.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from egress_gateway import __version__
from egress_gateway.audit import fields
from egress_gateway.policy.decision import Reason
from egress_gateway.policy.engine import Engine, PolicySet
from egress_gateway.policy.errors import InvalidName, InvalidTarget
from egress_gateway.policy.hostnames import parse_host_pattern
from egress_gateway.policy.model import GROUP_VERSION, Action
from egress_gateway.policy.near_miss import rule_matches_host
from egress_gateway.policy.targets import normalize_host
from egress_gateway.policy.validation import validate_object
from egress_gateway.trail.read import FlowRecord
from egress_gateway.trail.replay import facts_from_record

MAX_RULE_NAME = 63
WORKLOAD_LABELS = ("app.kubernetes.io/name", "app", "k8s-app")
# Engine reasons that mean "this destination is refused whatever a namespaced Allow says".
_REFUSED = frozenset({Reason.DENIED_BY_RULE, Reason.BLOCKED_ADDRESS, Reason.PRIVATE_ADDRESS})
_UNREACHABLE = frozenset({Reason.BLOCKED_ADDRESS.value, Reason.PRIVATE_ADDRESS.value})

Selector = tuple[tuple[str, str | None], ...]  # matchLabels pairs; a None value means "label absent"


@dataclass(slots=True)
class Suggestion:
    policies: list[dict[str, Any]] = field(default_factory=list)  # one per workload selector
    flows: int = 0
    destinations: Counter[str] = field(default_factory=Counter)  # "host:port" -> connections
    skipped: list[str] = field(default_factory=list)  # destinations left out, with why
    warnings: list[str] = field(default_factory=list)  # what --collapse newly admits
    first_seen: datetime | None = None
    last_seen: datetime | None = None

    @property
    def policy(self) -> dict[str, Any]:
        """The only policy (callers that asked for one selector)."""
        return self.policies[0]

    def to_yaml(self) -> str:
        window = ""
        if self.first_seen and self.last_seen:
            first, last = (t.isoformat(timespec="seconds") for t in (self.first_seen, self.last_seen))
            window = f" between {first} and {last}"
        lines = [
            f"# Suggested by egress-gateway {__version__} `audit --suggest-policy` from {self.flows} allowed "
            f"connection(s){window}.",
            "# Destinations seen (connections):",
        ]
        lines += [f"#   {dest}  {count}" for dest, count in sorted(self.destinations.items())]
        lines += [f"# not included: {why}" for why in self.skipped]
        lines += [f"# WARNING: {warning}" for warning in self.warnings]
        body = "---\n".join(
            yaml.safe_dump(policy, sort_keys=False, default_flow_style=False) for policy in self.policies
        )
        return "\n".join(lines) + "\n" + body


@dataclass(frozen=True, slots=True)
class _Seen:
    selector: Selector
    rule: str | None  # the name to keep (an existing rule this destination belongs to), if any
    host: str | None  # a normalized name, or None for an IP literal
    cidr: str | None
    port: int


def _workload_key(records: list[FlowRecord]) -> str | None:
    for key in WORKLOAD_LABELS:
        if any(key in r.pod_labels for r in records):
            return key
    return None


def _selector_of(record: FlowRecord, pod_labels: Mapping[str, str], key: str | None) -> Selector:
    if pod_labels:
        return tuple(sorted(pod_labels.items()))
    if key is None:
        return ()
    return ((key, record.pod_labels.get(key)),)


def collapse_hosts(names: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Replace two or more names that differ only in their first label with `*.parent` (the tightest wildcard).
    Returns the new list and, per wildcard made, the names it replaced."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(names)):
        by_parent[name.partition(".")[2]].append(name)
    out: set[str] = set()
    made: dict[str, list[str]] = {}
    for parent, members in by_parent.items():
        if len(members) >= 2 and parent:
            try:
                wildcard = parse_host_pattern(f"*.{parent}").text
            except InvalidName:
                pass  # e.g. `*.com`: too wide to suggest; keep the names
            else:
                out.add(wildcard)
                made[wildcard] = members
                continue
        out.update(members)
    return sorted(out), made


def collapse_warning(wildcard: str, members: list[str], is_public_suffix: Callable[[str], bool]) -> str:
    parent = wildcard.removeprefix("*.")
    text = (
        f"--collapse wrote `{wildcard}` for {', '.join(members)}; it newly admits every other name one label "
        f"under {parent}"
    )
    if is_public_suffix(parent):
        text += f" ({parent} is a public suffix: names there belong to different owners, e.g. anyone's bucket or site)"
    return text + "; review before merging, or drop --collapse"


def _rule_name(base: str, taken: set[str]) -> str:
    name = base[:MAX_RULE_NAME].rstrip("-")
    candidate, n = name, 2
    while candidate in taken:
        suffix = f"-{n}"
        candidate = name[: MAX_RULE_NAME - len(suffix)].rstrip("-") + suffix
        n += 1
    taken.add(candidate)
    return candidate


def _ports_label(ports: tuple[int, ...]) -> str:
    return "-".join(str(p) for p in ports[:6]) + ("-more" if len(ports) > 6 else "")


class _Screen:
    """Decides what must never be suggested, from the trail and (when given) the engine over the policies in force."""

    def __init__(self, namespace: str, engine: Engine | None) -> None:
        self.namespace = namespace
        self.engine = engine
        # The same policies without the namespace's own: what the cluster tiers (Admin, Baseline) decide when the
        # namespace's policies have no say. A suggestion must not override a Baseline Deny either.
        self.cluster_only = (
            Engine(engine.config, PolicySet.build(p for p in engine.policies.policies if p.namespace != namespace))
            if engine is not None
            else None
        )
        self.unreachable: dict[str, str] = {}  # name -> the recorded reason it was refused
        self._verdicts: dict[tuple[object, ...], str | None] = {}

    def note_refusal(self, record: FlowRecord) -> None:
        verdict = record.policy_verdict
        if verdict is not None and verdict.reason in _UNREACHABLE and record.host:
            self.unreachable.setdefault(record.host.lower(), verdict.reason)

    def refusal(self, record: FlowRecord) -> str | None:
        """Why this allowed flow must not be suggested, or None."""
        if record.attributes.get(fields.WOULD_DENY_REASON) == Reason.DENIED_BY_RULE.value:
            policy, rule = (
                record.attributes.get(fields.WOULD_DENY_POLICY),
                record.attributes.get(fields.WOULD_DENY_RULE),
            )
            return f"denied by Deny rule {rule!r} of {policy} (Audit mode)"
        if self.engine is None:
            return None
        facts = facts_from_record(record)
        key = (tuple(sorted(record.pod_labels.items())), facts.target, facts.port, facts.destination_ip, facts.sni)
        if key not in self._verdicts:
            why = None
            for engine in (self.engine, self.cluster_only):
                assert engine is not None
                decision = engine.decide(facts)
                if not decision.allowed and decision.reason in _REFUSED:
                    why = decision.message
                elif decision.would_deny and decision.audit_reason is Reason.DENIED_BY_RULE:
                    why = f"an Audit-mode policy would deny it: rule {decision.audit_rule!r} of {decision.audit_policy}"
                if why is not None:
                    break
            self._verdicts[key] = why
        return self._verdicts[key]

    def kept_name(self, record: FlowRecord, host: str | None, cidr: str | None) -> str | None:
        """The rule this destination belongs to: the rule of this namespace that allowed it, or an in-force Allow
        rule selecting the client that covers the host on other ports (the suggestion extends that rule)."""
        verdict = record.policy_verdict
        if (
            verdict is not None
            and verdict.rule
            and (verdict.policy or "").startswith(f"EgressPolicy/{self.namespace}/")
        ):
            return verdict.rule
        if self.engine is None or record.namespace is None:
            return None
        identity = facts_from_record(record).identity
        if identity is None:
            return None
        address = ipaddress.ip_network(cidr).network_address if cidr else None
        for policy in self.engine.policies.select(identity).policies:
            if policy.namespace != self.namespace:
                continue
            for rule in policy.rules:
                if rule.action is not Action.DENY and rule_matches_host(rule, host, address):
                    return rule.name
        return None


def suggest_policy(
    records: Iterable[FlowRecord],
    namespace: str,
    *,
    pod_labels: Mapping[str, str] | None = None,
    collapse: bool = False,
    name: str | None = None,
    mode: str = "Enforce",
    engine: Engine | None = None,
    is_public_suffix: Callable[[str], bool] = lambda _suffix: False,
) -> Suggestion:
    """Build (and validate) the policies; raises `PolicyValidationError` only on a bug, never on trail content.

    `engine` decides under the policies in force (their Deny rules, any tier, and address safety are respected;
    their rule names are kept where a suggestion extends a rule)."""
    pod_labels = dict(pod_labels or {})
    screen = _Screen(namespace, engine)
    selected: list[FlowRecord] = []
    for record in records:
        if record.namespace != namespace:
            continue
        screen.note_refusal(record)
        verdict = record.policy_verdict  # allowed by policy, even if the upstream then refused the connection
        if verdict is None or verdict.decision != "allow" or record.host is None or record.port is None:
            continue
        if all(record.pod_labels.get(k) == v for k, v in pod_labels.items()):
            selected.append(record)
    key = _workload_key(selected)
    suggestion = Suggestion()
    seen: dict[_Seen, None] = {}
    for record in selected:
        suggestion.flows += 1
        suggestion.destinations[record.destination] += 1
        if suggestion.first_seen is None or record.start < suggestion.first_seen:
            suggestion.first_seen = record.start
        if suggestion.last_seen is None or record.start > suggestion.last_seen:
            suggestion.last_seen = record.start
        entry = _entry(record, screen, suggestion, _selector_of(record, pod_labels, key))
        if entry is not None:
            seen[entry] = None
    suggestion.skipped = list(dict.fromkeys(suggestion.skipped))  # first-seen order, no repeats
    by_selector: dict[Selector, list[_Seen]] = defaultdict(list)
    for entry in seen:
        by_selector[entry.selector].append(entry)
    collapsed: dict[str, list[str]] = {}  # wildcard -> the names it replaced
    for selector, entries in sorted(by_selector.items(), key=lambda kv: [(k, v or "") for k, v in kv[0]]):
        policy_name = _policy_name(namespace, name, selector, len(by_selector))
        suggestion.policies.append(_policy(namespace, policy_name, selector, mode, entries, collapse, collapsed))
    suggestion.warnings = [collapse_warning(w, members, is_public_suffix) for w, members in collapsed.items()]
    for policy in suggestion.policies:
        validate_object(policy)
    return suggestion


def _entry(record: FlowRecord, screen: _Screen, suggestion: Suggestion, selector: Selector) -> _Seen | None:
    assert record.host is not None and record.port is not None
    try:
        target = normalize_host(record.host)
    except InvalidTarget as exc:
        suggestion.skipped.append(f"{record.destination}: {exc}")
        return None
    if target.name is not None and target.name in screen.unreachable:
        reason = screen.unreachable[target.name]
        suggestion.skipped.append(f"{record.destination}: the trail saw it resolve to a refused address ({reason})")
        return None
    refusal = screen.refusal(record)
    if refusal is not None:
        suggestion.skipped.append(f"{record.destination}: {refusal}")
        return None
    if target.ip is not None:
        cidr = str(ipaddress.ip_network(target.ip))  # /32 or /128
        return _Seen(selector, screen.kept_name(record, None, cidr), None, cidr, record.port)
    assert target.name is not None
    try:
        parse_host_pattern(target.name)
    except InvalidName as exc:
        suggestion.skipped.append(f"{record.destination}: {exc}")
        return None
    return _Seen(selector, screen.kept_name(record, target.name, None), target.name, None, record.port)


def _policy_name(namespace: str, name: str | None, selector: Selector, count: int) -> str:
    workload = "-".join((value or f"no-{key.rpartition('/')[2]}") for key, value in selector)
    if name and count == 1:
        return name
    base = name or f"{namespace}-observed"
    return f"{base}-{workload}"[:253] if workload else base


def _policy(
    namespace: str,
    name: str,
    selector: Selector,
    mode: str,
    entries: list[_Seen],
    collapse: bool,
    collapsed: dict[str, list[str]],
) -> dict[str, Any]:
    # (kept rule name or None, is ip) -> destination -> ports
    groups: dict[tuple[str | None, bool], dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for entry in entries:
        target = entry.host if entry.host is not None else entry.cidr
        assert target is not None
        groups[(entry.rule, entry.host is None)][target].add(entry.port)
    rules: list[dict[str, Any]] = []
    taken: set[str] = set()
    for (kept, is_ip), destinations in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] or "~")):
        by_ports: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for target, port_set in destinations.items():
            by_ports[tuple(sorted(port_set))].append(target)
        for ports, targets in sorted(by_ports.items()):
            base = kept or (f"seen-ips-{_ports_label(ports)}" if is_ip else f"seen-{_ports_label(ports)}")
            rule_name = _rule_name(base, taken)
            if is_ip:
                rules.append({"name": rule_name, "cidrs": sorted(targets), "ports": list(ports)})
                continue
            listed = sorted(targets)
            if collapse:
                listed, made = collapse_hosts(targets)
                for wildcard, members in made.items():
                    known = collapsed.setdefault(wildcard, [])
                    known += [m for m in members if m not in known]
            rules.append({"name": rule_name, "hosts": listed, "ports": list(ports)})
    spec: dict[str, Any] = {}
    labels = {k: v for k, v in selector if v is not None}
    absent = [{"key": k, "operator": "DoesNotExist"} for k, v in selector if v is None]
    if labels or absent:
        spec["podSelector"] = {}
        if labels:
            spec["podSelector"]["matchLabels"] = labels
        if absent:
            spec["podSelector"]["matchExpressions"] = absent
    spec["mode"] = mode
    spec["rules"] = rules
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
