"""The gateway's resolver against a real (scripted) DNS server on loopback and the system resolver."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator

import pytest

from egress_gateway.policy.decision import Reason
from egress_gateway.proxy.resolver import ResolveError, Resolver, parse_nameserver
from tests.support.dns_server import ScriptedDNS


@pytest.fixture
def dns_server() -> Iterator[ScriptedDNS]:
    server = ScriptedDNS({"api.test": ["127.0.0.20"], "flip.test": ["127.0.0.21", "127.0.0.22"]}).start()
    yield server
    server.stop()


def resolve(resolver: Resolver, name: str) -> tuple[str, ...]:
    return tuple(str(a) for a in asyncio.run(resolver.resolve(name)))


def test_static_hosts_come_first_and_are_normalized(dns_server: ScriptedDNS) -> None:
    resolver = Resolver({"API.Test.": ["127.0.0.99", "::ffff:127.0.0.98"]}, [dns_server.address], 2)
    assert resolve(resolver, "api.test") == ("127.0.0.99", "127.0.0.98")
    assert dns_server.queries == []


def test_dns_answers_are_used(dns_server: ScriptedDNS) -> None:
    resolver = Resolver({}, [dns_server.address], 2)
    assert resolve(resolver, "api.test") == ("127.0.0.20",)
    assert dns_server.a_queries("api.test") == 1


def test_ttl_zero_answers_are_not_cached(dns_server: ScriptedDNS) -> None:
    resolver = Resolver({}, [dns_server.address], 2)
    assert resolve(resolver, "flip.test") == ("127.0.0.21",)
    assert resolve(resolver, "flip.test") == ("127.0.0.22",)


def test_an_answer_is_reused_until_its_ttl_ends_then_asked_again() -> None:
    server = ScriptedDNS({"api.test": ["127.0.0.20", "127.0.0.30"]}, ttl=3).start()
    try:
        resolver = Resolver({}, [server.address], 2)
        assert [resolve(resolver, "api.test") for _ in range(20)] == [("127.0.0.20",)] * 20
        assert server.a_queries("api.test") == 1
        time.sleep(3.5)
        assert resolve(resolver, "api.test") == ("127.0.0.30",)
        assert server.a_queries("api.test") == 2
    finally:
        server.stop()


def test_nxdomain_is_dns_error(dns_server: ScriptedDNS) -> None:
    resolver = Resolver({}, [dns_server.address], 2)
    with pytest.raises(ResolveError) as caught:
        resolve(resolver, "missing.test")
    assert caught.value.reason is Reason.DNS_ERROR


def test_silent_nameserver_is_dns_timeout() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = Resolver({}, [f"127.0.0.1:{silent.getsockname()[1]}"], 0.3)
        with pytest.raises(ResolveError) as caught:
            resolve(resolver, "api.test")
        assert caught.value.reason is Reason.DNS_TIMEOUT
    finally:
        silent.close()


def test_system_resolver_reads_etc_hosts() -> None:
    resolver = Resolver({}, [], 2)
    assert resolver.uses_system_resolver
    assert ipaddress.ip_address(resolve(resolver, "localhost")[0]).is_loopback


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.10", ("10.0.0.10", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:53", ("::1", 53)),
        ("::1", ("::1", 53)),
    ],
)
def test_nameserver_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["dns.google", "127.0.0.1:0", "127.0.0.1:99999"])
def test_bad_nameservers_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_bad_static_hosts_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"resolver\.hosts"):
        Resolver({"api.test": ["not-an-ip"]}, [], 1)
    with pytest.raises(ValueError, match=r"resolver\.hosts"):
        Resolver({"api.test": []}, [], 1)
