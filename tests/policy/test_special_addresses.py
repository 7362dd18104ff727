"""The special-purpose address table (egress_gateway/policy/special_addresses.json), entry by entry.

Issue 12, class 7: every entry of the IANA IPv4 and IPv6 special-purpose registries and every cloud metadata
endpoint is classified with its own reason, and an IPv6 form that embeds an IPv4 address is classified by that
address too. These tests run the whole table through the engine's classifier; tests/hardening/
test_address_classes_dns.py does the same end to end through a DNS server.
"""

from __future__ import annotations

import ipaddress
import json
from importlib import resources

import pytest

from egress_gateway.policy.addresses import SPECIAL_RANGES, AddressClass, AddressPolicy, special_range
from egress_gateway.policy.decision import Facts, Identity, Reason
from tests.policy.test_decision import engine_for

TABLE = json.loads(resources.files("egress_gateway.policy").joinpath("special_addresses.json").read_text("utf-8"))
ENTRIES = TABLE["entries"]


def sample(network: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address inside `network` that no more specific entry of the table covers."""
    net = ipaddress.ip_network(network)
    candidates = [net.network_address, net.broadcast_address, net.network_address + (net.num_addresses // 2)]
    for candidate in candidates:
        found = special_range(candidate)
        if found is not None and found.network == net:
            return candidate
    raise AssertionError(f"no address of {network} is classified by its own entry")


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["network"] for e in ENTRIES])
def test_every_entry_names_its_source_and_classifies_its_addresses_with_its_reason(entry: dict[str, str]) -> None:
    assert entry["source"], entry
    for key in entry["source"].split():
        assert key in TABLE["sources"], f"{entry['network']}: unknown source {key!r}"
    address = sample(entry["network"])
    if address.version == 6 and entry.get("embeds"):
        pytest.skip("an embedding prefix is classified by the address it embeds (tests below)")
    verdict = AddressPolicy().classify(address)
    expected = AddressClass.BLOCKED if entry["class"] == "metadata" else AddressClass(entry["class"])
    assert verdict.cls is expected, (address, verdict)
    if expected is not AddressClass.PUBLIC:
        assert entry["name"] in verdict.detail and entry["reference"] in verdict.detail


def test_the_table_covers_both_complete_iana_registries() -> None:
    networks = {e["network"] for e in ENTRIES}
    # Spot checks of entries that were missing before issue 12 (IPv4 then IPv6 registry).
    for network in (
        "192.0.0.0/24", "192.0.0.170/32", "192.88.99.0/24", "198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24",
        "203.0.113.0/24", "100::/64", "2001:2::/48", "2001:db8::/32", "3fff::/20", "5f00::/16", "2001:20::/28",
    ):  # fmt: skip
        assert network in networks
    assert len(SPECIAL_RANGES) == len(ENTRIES)


METADATA = {
    "169.254.169.254": "cloud instance metadata",
    "168.63.129.16": "Azure WireServer",
    "100.100.100.200": "Alibaba",
    "192.0.0.192": "Oracle",
    "fd00:ec2::254": "AWS instance metadata",
    "fd20:ce::254": "Google Cloud metadata",
    "fd00:c1::a9fe:a9fe": "Oracle Cloud",
    "169.254.170.2": "ECS",
    "fe80::a9fe:a9fe": "OpenStack",
}


@pytest.mark.parametrize("address", list(METADATA))
def test_metadata_endpoints_are_blocked_with_their_provider_and_no_allowed_range_opens_them(address: str) -> None:
    ip = ipaddress.ip_address(address)
    wide_open = AddressPolicy(allowed_ranges=[ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")])
    for policy in (AddressPolicy(), wide_open):
        verdict = policy.classify(ip)
        assert verdict.cls is AddressClass.BLOCKED
        assert METADATA[address] in verdict.detail and "cloud metadata endpoint" in verdict.detail


EMBEDDED = {
    "::ffff:169.254.169.254": "cloud instance metadata",  # IPv4-mapped
    "::ffff:0:a9fe:a9fe": "cloud instance metadata",  # IPv4-translated (SIIT)
    "::a9fe:a9fe": "cloud instance metadata",  # IPv4-compatible
    "64:ff9b::a9fe:a9fe": "cloud instance metadata",  # NAT64 well-known prefix
    "64:ff9b:1::a9fe:a9fe": "cloud instance metadata",  # local-use NAT64, last 32 bits
    "64:ff9b:1:a9fe:a9:fe00::": "cloud instance metadata",  # local-use NAT64, RFC 6052 /48 layout
    "2002:a83f:8110::1": "Azure WireServer",  # 6to4 of 168.63.129.16
    "::ffff:0:c612:1": "benchmarking",  # IPv4-translated 198.18.0.1
    "64:ff9b::c000:c0": "Oracle",  # NAT64 of 192.0.0.192
}


def _teredo_for(client: str) -> str:
    server = int(ipaddress.IPv4Address("65.54.227.120"))
    obfuscated = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    port = 0xFFFF  # obfuscated port 0
    return str(ipaddress.IPv6Address((0x20010000 << 96) | (server << 64) | (0x8000 << 48) | (port << 32) | obfuscated))


EMBEDDED[_teredo_for("169.254.169.254")] = "cloud instance metadata"  # Teredo client address


@pytest.mark.parametrize("address", list(EMBEDDED))
def test_ipv6_forms_are_classified_by_the_ipv4_address_they_embed(address: str) -> None:
    verdict = AddressPolicy().classify(ipaddress.ip_address(address))
    assert verdict.cls is AddressClass.BLOCKED, verdict
    assert EMBEDDED[address] in verdict.detail


def test_an_embedded_private_address_makes_a_public_form_private() -> None:
    verdict = AddressPolicy().classify(ipaddress.ip_address("64:ff9b::a00:1"))  # NAT64 of 10.0.0.1
    assert verdict.cls is AddressClass.PRIVATE and "10.0.0.1" in verdict.detail


def test_ordinary_public_addresses_stay_public() -> None:
    for address in ("93.184.216.34", "1.1.1.1", "2606:4700::1111", "64:ff9b::5db8:d822", "192.0.0.9"):
        verdict = AddressPolicy().classify(ipaddress.ip_address(address))
        assert verdict.cls in (AddressClass.PUBLIC, AddressClass.PRIVATE), (address, verdict)
    assert AddressPolicy().classify(ipaddress.ip_address("93.184.216.34")).cls is AddressClass.PUBLIC


WIDE = """
apiVersion: egressgateway.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: wide}
spec:
  rules:
    - name: everything
      cidrs: ["0.0.0.0/0", "::/0"]
"""


@pytest.mark.parametrize(("address", "what"), [("198.18.0.1", "benchmarking"), ("168.63.129.16", "Azure WireServer")])
def test_the_engine_denies_a_special_address_with_its_reason_even_when_a_rule_lists_it(address: str, what: str) -> None:
    engine = engine_for(WIDE)
    ip = ipaddress.ip_address(address)
    decision = engine.decide(Facts(Identity(namespace="shop"), address, 443, destination_ip=ip))
    assert decision.reason is Reason.BLOCKED_ADDRESS and what in decision.message


def test_ipv6_loopback_and_unspecified_are_themselves_not_ipv4_compatible_forms() -> None:
    allowed = AddressPolicy(allowed_ranges=[ipaddress.ip_network("::1/128")])
    assert allowed.classify(ipaddress.ip_address("::1")).cls is AddressClass.PUBLIC
    assert AddressPolicy().classify(ipaddress.ip_address("::1")).detail.startswith("::1 is loopback")
    assert "0.0.0.2" in AddressPolicy().classify(ipaddress.ip_address("::2")).detail  # a real compatible form
