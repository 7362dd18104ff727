"""Property-based checks: the compiled indexes agree with brute-force reference matchers."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from egress_gateway.policy.hostnames import HostPattern, normalize_name, parse_host_pattern
from egress_gateway.policy.indexes import CidrIndex, HostIndex
from egress_gateway.policy.model import LabelSelector, LabelSelectorOperator, LabelSelectorRequirement
from egress_gateway.policy.selectors import compile_selector

LABELS = st.sampled_from(["a", "b", "c", "api", "s3", "eu", "example", "com", "org"])
names = st.lists(LABELS, min_size=1, max_size=5).map(lambda ls: ".".join([*ls, "com"]))
pattern_labels = st.lists(st.one_of(LABELS, st.just("*")), min_size=1, max_size=4)


@st.composite
def patterns(draw: st.DrawFn) -> HostPattern:
    labels = draw(pattern_labels)
    if draw(st.booleans()):
        labels = ["**", *labels]
    if all(label in ("*", "**") for label in labels):
        labels.append("example")
    return parse_host_pattern(".".join([*labels, "com"]))


def reference_match(pattern: HostPattern, name: str) -> bool:
    """Independent reference: recursive label matching written from the grammar's wording."""

    def go(p: list[str], n: list[str]) -> bool:
        if not p:
            return not n
        head, *rest = p
        if head == "**":
            return any(go(rest, n[k:]) for k in range(1, len(n) + 1))
        return bool(n) and (head == "*" or head == n[0]) and go(rest, n[1:])

    return go(list(pattern.labels), name.split("."))


@settings(max_examples=300, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=12), st.lists(names, min_size=1, max_size=10))
def test_host_index_agrees_with_reference(pats: list[HostPattern], queries: list[str]) -> None:
    index: HostIndex[int] = HostIndex()
    for i, p in enumerate(pats):
        index.add(p, i)
    for name in queries:
        got = sorted(i for i, _ in index.lookup(name))
        want = sorted(i for i, p in enumerate(pats) if reference_match(p, name))
        assert got == want, (name, [p.text for p in pats])
        assert all(p.matches(name) == reference_match(p, name) for p in pats)


@settings(max_examples=200, deadline=None)
@given(names, st.booleans(), st.booleans())
def test_normalization_is_invariant_under_case_and_trailing_dot(name: str, upper: bool, dot: bool) -> None:
    spelled = (name.upper() if upper else name) + ("." if dot else "")
    assert normalize_name(spelled) == normalize_name(name) == name


v4_networks = st.builds(
    lambda addr, plen: ipaddress.IPv4Network((addr, plen), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_networks = st.builds(
    lambda addr, plen: ipaddress.IPv6Network((addr, plen), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(v4_networks, v6_networks), min_size=1, max_size=20),
    st.lists(
        st.one_of(
            st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
            st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
        ),
        max_size=20,
    ),
)
def test_cidr_index_agrees_with_ipaddress(networks: list, addresses: list) -> None:  # type: ignore[type-arg]
    index: CidrIndex[int] = CidrIndex()
    for i, net in enumerate(networks):
        index.add(net, i)
    probes = addresses + [net.network_address for net in networks] + [net.broadcast_address for net in networks]
    for address in probes:
        got = sorted(i for i, _ in index.lookup(address))
        want = sorted(i for i, net in enumerate(networks) if net.version == address.version and address in net)
        assert got == want


KEYS = st.sampled_from(["app", "tier", "team"])
VALUES = st.sampled_from(["x", "y", "z"])


@st.composite
def selectors(draw: st.DrawFn) -> LabelSelector:
    match_labels = draw(st.dictionaries(KEYS, VALUES, max_size=2))
    expressions = []
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(list(LabelSelectorOperator)))
        values = draw(st.lists(VALUES, min_size=1, max_size=2)) if op in ("In", "NotIn") else None
        expressions.append(LabelSelectorRequirement(key=draw(KEYS), operator=op, values=values))
    return LabelSelector(matchLabels=match_labels or None, matchExpressions=expressions or None)


def reference_selects(selector: LabelSelector, labels: dict[str, str]) -> bool:
    """The Kubernetes documentation's wording, term by term."""
    for k, v in (selector.match_labels or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.match_expressions or []:
        present = e.key in labels
        if e.operator == "In" and not (present and labels[e.key] in (e.values or [])):
            return False
        if e.operator == "NotIn" and present and labels[e.key] in (e.values or []):
            return False
        if e.operator == "Exists" and not present:
            return False
        if e.operator == "DoesNotExist" and present:
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(selectors(), st.dictionaries(KEYS, VALUES, max_size=3))
def test_label_selector_agrees_with_reference(selector: LabelSelector, labels: dict[str, str]) -> None:
    assert compile_selector(selector).matches(labels) == reference_selects(selector, labels)
