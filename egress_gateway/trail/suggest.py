"""`audit --suggest-policy`: the EgressPolicy that would allow exactly what a namespace was seen using.

From the trail's allowed flows of one namespace (Audit-mode would-deny flows are allowed flows too), optionally
only those of pods carrying given labels, build one rule per distinct port set: names under `hosts`, IP literals
under `cidrs` as /32 or /128. Names are collapsed into `*.parent` only when asked, and only where two or more
siblings share a parent. The result is validated with the same `validate_object` that `lint` uses before it is
printed. Imports the policy core (targets, hostnames, validation) and `trail`; no I/O besides what the caller does.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from egress_gateway import __version__
from egress_gateway.policy.errors import InvalidName, InvalidTarget
from egress_gateway.policy.hostnames import parse_host_pattern
from egress_gateway.policy.model import GROUP_VERSION
from egress_gateway.policy.targets import normalize_host
from egress_gateway.policy.validation import validate_object
from egress_gateway.trail.read import FlowRecord

MAX_RULE_NAME = 63


@dataclass(slots=True)
class Suggestion:
    policy: dict[str, Any]
    flows: int = 0
    destinations: Counter[str] = field(default_factory=Counter)  # "host:port" -> connections
    skipped: list[str] = field(default_factory=list)  # destinations that cannot be expressed, with why
    first_seen: datetime | None = None
    last_seen: datetime | None = None

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
        body = yaml.safe_dump(self.policy, sort_keys=False, default_flow_style=False)
        return "\n".join(lines) + "\n" + body


def _selected(record: FlowRecord, namespace: str, pod_labels: Mapping[str, str]) -> bool:
    if record.namespace != namespace:
        return False
    verdict = record.policy_verdict  # allowed by policy, even if the upstream then refused the connection
    if verdict is None or verdict.decision != "allow":
        return False
    labels = record.pod_labels
    return all(labels.get(k) == v for k, v in pod_labels.items())


def collapse_hosts(names: Iterable[str]) -> list[str]:
    """Replace two or more names that differ only in their first label with `*.parent` (the tightest wildcard)."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for name in sorted(set(names)):
        parent = name.partition(".")[2]
        by_parent[parent].append(name)
    out: set[str] = set()
    for parent, members in by_parent.items():
        if len(members) >= 2 and parent:
            try:
                out.add(parse_host_pattern(f"*.{parent}").text)
                continue
            except InvalidName:
                pass  # e.g. `*.com`: too wide to suggest; keep the names
        out.update(members)
    return sorted(out)


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


def suggest_policy(
    records: Iterable[FlowRecord],
    namespace: str,
    *,
    pod_labels: Mapping[str, str] | None = None,
    collapse: bool = False,
    name: str | None = None,
    mode: str = "Enforce",
) -> Suggestion:
    """Build (and validate) the policy; raises `PolicyValidationError` only on a bug, never on trail content."""
    pod_labels = dict(pod_labels or {})
    name_ports: dict[str, set[int]] = defaultdict(set)
    ip_ports: dict[str, set[int]] = defaultdict(set)
    suggestion = Suggestion(policy={})
    for record in records:
        if not _selected(record, namespace, pod_labels):
            continue
        host, port = record.host, record.port
        if host is None or port is None:
            continue
        suggestion.flows += 1
        suggestion.destinations[record.destination] += 1
        if suggestion.first_seen is None or record.start < suggestion.first_seen:
            suggestion.first_seen = record.start
        if suggestion.last_seen is None or record.start > suggestion.last_seen:
            suggestion.last_seen = record.start
        try:
            target = normalize_host(host)
        except InvalidTarget as exc:
            suggestion.skipped.append(f"{record.destination}: {exc}")
            continue
        if target.ip is not None:
            network = ipaddress.ip_network(target.ip)  # /32 or /128
            ip_ports[str(network)].add(port)
        elif target.name is not None:
            try:
                parse_host_pattern(target.name)
            except InvalidName as exc:
                suggestion.skipped.append(f"{record.destination}: {exc}")
                continue
            name_ports[target.name].add(port)

    rules: list[dict[str, Any]] = []
    taken: set[str] = set()
    by_ports: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for host, host_ports in name_ports.items():
        by_ports[tuple(sorted(host_ports))].append(host)
    for ports, hosts in sorted(by_ports.items()):
        listed = collapse_hosts(hosts) if collapse else sorted(hosts)
        rules.append({"name": _rule_name(f"seen-{_ports_label(ports)}", taken), "hosts": listed, "ports": list(ports)})
    cidr_ports: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for cidr, ip_port_set in ip_ports.items():
        cidr_ports[tuple(sorted(ip_port_set))].append(cidr)
    for ports, cidrs in sorted(cidr_ports.items()):
        rule_name = _rule_name(f"seen-ips-{_ports_label(ports)}", taken)
        rules.append({"name": rule_name, "cidrs": sorted(cidrs), "ports": list(ports)})

    spec: dict[str, Any] = {}
    if pod_labels:
        spec["podSelector"] = {"matchLabels": pod_labels}
    spec["mode"] = mode
    spec["rules"] = rules
    suggestion.policy = {
        "apiVersion": GROUP_VERSION,
        "kind": "EgressPolicy",
        "metadata": {"name": name or f"{namespace}-observed", "namespace": namespace},
        "spec": spec,
    }
    validate_object(suggestion.policy)
    return suggestion
