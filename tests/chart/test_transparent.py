"""Transparent mode in the chart: off by default; enabled, the listeners reach the config the settings model loads,
the Service, the container, the NetworkPolicies, the CoreDNS server blocks and the install notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from egress_gateway.settings import load_settings
from tests.chart.conftest import Helm, HelmError, find, one
from tests.chart.test_rendering import FULLNAME, _container, _notes

ENABLED = ("transparent.enabled=true",)
DNS = (*ENABLED, "service.clusterIP=10.96.0.50", "transparent.dns.zones={api.stripe.com,example.org}")


def _settings(objects: list[dict[str, Any]], tmp_path: Path) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    return load_settings(path)


def test_off_by_default(default_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = _settings(default_objects, tmp_path)
    assert settings.transparent.tls_listen is None and settings.transparent.http_listen is None
    service = one(default_objects, "Service", FULLNAME)
    assert [p["name"] for p in service["spec"]["ports"]] == ["proxy"]
    assert not find(default_objects, "ConfigMap", f"{FULLNAME}-coredns")


def test_enabled_listeners_reach_the_settings_service_and_container(helm3: Helm, tmp_path: Path) -> None:
    objects = helm3.objects(set_values=ENABLED)
    transparent = _settings(objects, tmp_path).transparent
    assert (transparent.tls_listen, transparent.tls_port) == ("0.0.0.0:3129", 443)
    assert (transparent.http_listen, transparent.http_port) == ("0.0.0.0:3130", 80)
    assert transparent.check_original_destination is True
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in one(objects, "Service", FULLNAME)["spec"]["ports"]}
    assert ports["transparent-tls"] == (443, "transparent-tls")
    assert ports["transparent-http"] == (80, "transparent-http")
    container_ports = {p["name"]: p["containerPort"] for p in _container(objects)["ports"]}
    assert container_ports["transparent-tls"] == 3129 and container_ports["transparent-http"] == 3130


def test_http_listener_can_be_left_off(helm3: Helm, tmp_path: Path) -> None:
    objects = helm3.objects(set_values=(*ENABLED, "transparent.http.enabled=false"))
    transparent = _settings(objects, tmp_path).transparent
    assert transparent.tls_listen == "0.0.0.0:3129" and transparent.http_listen is None
    assert "transparent-http" not in {p["name"] for p in one(objects, "Service", FULLNAME)["spec"]["ports"]}


def test_network_policies_admit_the_transparent_ports(helm3: Helm) -> None:
    objects = helm3.objects(
        set_values=(
            *ENABLED,
            "networkPolicy.enabled=true",
            "networkPolicy.egress.apiServer.cidrs={172.18.0.2/32}",
            "enforcement.namespaces={shop}",
        )
    )
    gateway_ingress = [
        port["port"]
        for policy in find(objects, "NetworkPolicy")
        if policy["metadata"]["name"] == FULLNAME
        for rule in policy["spec"].get("ingress", [])
        for port in rule.get("ports", [])
    ]
    assert {"proxy", "transparent-tls", "transparent-http"} <= set(gateway_ingress)
    enforce = [p for p in find(objects, "NetworkPolicy") if p["metadata"]["namespace"] == "shop"]
    assert enforce
    allowed = {port["port"] for rule in enforce[0]["spec"]["egress"] for port in rule.get("ports", [])}
    assert {3128, 3129, 3130} <= allowed


def test_dns_zones_render_coredns_server_blocks_answering_the_service_address(helm3: Helm) -> None:
    objects = helm3.objects(set_values=DNS)
    assert one(objects, "Service", FULLNAME)["spec"]["clusterIP"] == "10.96.0.50"
    blocks = one(objects, "ConfigMap", f"{FULLNAME}-coredns")["data"]["egress-gateway.server"]
    for zone in ("api.stripe.com", "example.org"):
        assert f"{zone}:53 {{" in blocks
        assert f"template IN A {zone} {{" in blocks
    assert 'answer "{{ .Name }} 30 IN A 10.96.0.50"' in blocks


def test_dns_zones_without_a_fixed_service_address_fail_with_the_reason(helm3: Helm) -> None:
    with pytest.raises(HelmError, match=r"service\.clusterIP"):
        helm3.objects(set_values=(*ENABLED, "transparent.dns.zones={api.stripe.com}"))


def test_unknown_transparent_keys_are_rejected_by_the_schema(helm3: Helm) -> None:
    with pytest.raises(HelmError, match="transparent"):
        helm3.objects(set_values=(*ENABLED, "transparent.tls.port=1"))


def test_notes_print_the_init_container_snippet_with_net_admin(helm3: Helm, chart_copy: Path) -> None:
    notes = _notes(helm3, chart_copy, *DNS)
    assert "Transparent mode is ON" in notes
    assert "NET_ADMIN" in notes
    assert "iptables -t nat -A OUTPUT -d 10.96.0.0/12 -j RETURN" in notes  # the default service CIDR stays direct
    assert '-p tcp --dport 443 -j DNAT --to-destination "$gw:443"' in notes
    assert '-p tcp --dport 80 -j DNAT --to-destination "$gw:80"' in notes
    assert f"{FULLNAME}-coredns" in notes
    assert "Transparent mode" not in _notes(helm3, chart_copy)
