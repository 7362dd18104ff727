"""The host grammar of docs/policy-reference.md, one row per example."""

from __future__ import annotations

import pytest

from egress_gateway.policy.errors import InvalidName
from egress_gateway.policy.hostnames import normalize_name, parse_host_pattern

MATCHES = [
    # pattern, name, matches
    ("api.example.com", "api.example.com", True),
    ("api.example.com", "API.Example.COM", True),
    ("api.example.com", "api.example.com.", True),
    ("api.example.com", "www.api.example.com", False),
    ("api.example.com", "example.com", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("s3.*.amazonaws.com", "s3.eu-west-1.amazonaws.com", True),
    ("s3.*.amazonaws.com", "s3.amazonaws.com", False),
    ("s3.*.amazonaws.com", "s3.a.b.amazonaws.com", False),
    ("**.example.com", "a.example.com", True),
    ("**.example.com", "a.b.example.com", True),
    ("**.example.com", "example.com", False),
    ("**.example.com", "a.example.org", False),
    ("Bücher.example", "xn--bcher-kva.example", True),
    ("*.bücher.example", "shop.BÜCHER.example", True),
    ("API.Example.com.", "api.example.com", True),
]

INVALID = [
    ("api-*.example.com", "partial-label wildcard"),
    ("*", "matches every name"),
    ("**", "matches every name"),
    ("example.*", "last label"),
    ("*.com", "top-level domain"),
    ("a..example.com", "empty label"),
    ("a.**.example.com", "leftmost"),
    (("a" * 64) + ".example.com", "longer than 63"),
    (".".join(["abcdefghi"] * 26) + ".com", "longer than 253"),
    ("10.0.0.1", "cidrs"),
    ("2001:db8::1", "cidrs"),
    ("10.0.0.0/8", "cidrs"),
    ("localhost", "single label"),
    ("bang!.example.com", "invalid label"),
    ("under score.example.com", "not a valid"),
    ("-bad.example.com", "invalid label"),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), MATCHES)
def test_pattern_matches_like_the_reference_table(pattern: str, name: str, expected: bool) -> None:
    compiled = parse_host_pattern(pattern)
    from egress_gateway.policy.targets import normalize_host

    assert compiled.matches(str(normalize_host(name))) is expected


@pytest.mark.parametrize(("pattern", "why"), INVALID)
def test_invalid_patterns_are_rejected_with_a_reason(pattern: str, why: str) -> None:
    with pytest.raises(InvalidName, match=why):
        parse_host_pattern(pattern)


def test_names_are_lowercased_without_trailing_dot_and_in_a_labels() -> None:
    assert normalize_name("WWW.Example.COM.") == "www.example.com"
    assert normalize_name("münchen.de") == "xn--mnchen-3ya.de"


def test_ip_literal_in_hosts_error_points_to_cidrs() -> None:
    with pytest.raises(InvalidName, match=r"list addresses under `cidrs` \(e.g. 10.0.0.1/32\)"):
        parse_host_pattern("10.0.0.1")
