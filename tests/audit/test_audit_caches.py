"""The per-connection caches of the audit path change no output: bounded, keyed by identity, never stale."""

from __future__ import annotations

import ipaddress
import json
from types import MappingProxyType
from typing import Any

import pytest

from egress_gateway.audit import fields, logs, otlp_json
from egress_gateway.audit.jsonl import sdk_spans_to_lines, span_to_line
from egress_gateway.audit.logs import configure_logging, log_decision
from egress_gateway.policy.decision import Identity, Reason
from tests.audit.conftest import SHOP, MemoryRecorder, allow, deny, facts


def _tunnel(recorder: MemoryRecorder, identity: Identity, port: int, *, sni_decision: Any = None) -> None:
    first = allow()
    record = recorder.open("CONNECT", "10.0.0.1", port)
    record.set(server_address="api.stripe.com", server_port=443)
    record.decided(facts(identity=identity, destination_ip="93.184.216.34"), first)
    record.set(tls=True, tls_client_server_name="api.stripe.com")
    record.decided(facts(identity=identity, sni="api.stripe.com"), sni_decision or first)
    record.close(bytes_sent=1, bytes_received=2)


def test_a_workload_whose_labels_change_is_recorded_with_its_new_labels(recorder: MemoryRecorder) -> None:
    relabeled = Identity(
        namespace=SHOP.namespace,
        pod=SHOP.pod,
        labels=MappingProxyType({"app": "web", "version": "2"}),
        namespace_labels=SHOP.namespace_labels,
    )
    _tunnel(recorder, SHOP, 40000)
    _tunnel(recorder, relabeled, 40001)
    _tunnel(recorder, SHOP, 40002)
    first, second, third = (dict(span.attributes or {}) for span in recorder.exporter.get_finished_spans())
    assert "k8s.pod.label.version" not in first and "k8s.pod.label.version" not in third
    assert second["k8s.pod.label.version"] == "2"
    assert first == {**third, "client.port": 40000}


def test_identity_attributes_are_copies_and_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    first = fields.identity_attributes(SHOP)
    first["k8s.pod.name"] = "changed by a caller"
    assert fields.identity_attributes(SHOP)["k8s.pod.name"] == "web-7d9f"
    monkeypatch.setattr(fields, "_MAX_CACHED", 2)
    monkeypatch.setattr(fields, "_identity_attributes", {})
    names = [f"ns-{index}" for index in range(5)]
    for name in names * 2:
        assert fields.identity_attributes(Identity(namespace=name))["k8s.namespace.name"] == name
    assert len(fields._identity_attributes) <= 2


def test_a_changed_sni_decision_replaces_the_decision_attributes(recorder: MemoryRecorder) -> None:
    _tunnel(recorder, SHOP, 40010, sni_decision=deny(Reason.SNI_MISMATCH, "SNI mismatch"))
    (span,) = recorder.exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["egress.reason"] == "sni_mismatch"
    assert "egress.rule" not in attrs
    assert [(event.attributes or {})["egress.reason"] for event in span.events if event.name == "decided"] == [
        "allowed_by_rule",
        "sni_mismatch",
    ]


def test_set_keys_are_mapped_the_same_every_time() -> None:
    for _ in range(2):
        assert fields.proxy_attributes(
            {"tls": True, "server_port": 443, "proxy_authorization": "Basic x", "tls_alpn": "h2", "egress.x": 1}
        ) == {"egress.tls": True, "server.port": 443, "egress.tls_alpn": "h2", "egress.x": 1}
    assert fields.proxy_attributes({"error": Reason.DNS_ERROR, "none": None}) == {"egress.error": "dns_error"}


def test_an_address_object_is_written_as_its_own_text() -> None:
    for text in ("93.184.216.34", "2001:db8::1", "93.184.216.34", "10.0.0.1"):
        out = fields.facts_attributes(facts(destination_ip=ipaddress.ip_address(text)))
        assert out["network.peer.address"] == text


def test_trail_lines_stay_exact_when_the_encoder_caches_overflow(
    recorder: MemoryRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(otlp_json, "_MAX_CACHED_ITEMS", 3)
    monkeypatch.setattr(otlp_json, "_MAX_CACHED_KEYS", 3)
    monkeypatch.setattr(otlp_json, "_string_items", {})
    monkeypatch.setattr(otlp_json, "_key_openings", {})
    for port in range(40020, 40026):
        _tunnel(recorder, SHOP, port)
    spans = list(recorder.exporter.get_finished_spans())
    assert [span_to_line(span) for span in spans] == sdk_spans_to_lines(spans)
    assert [span_to_line(span) for span in spans] == sdk_spans_to_lines(spans)  # now from the (small) caches
    assert len(otlp_json._string_items) <= 3 and len(otlp_json._key_openings) <= 3


def test_decision_lines_stay_exact_when_the_line_caches_overflow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    monkeypatch.setattr(logs, "_MAX_CACHED_ITEMS", 2)
    monkeypatch.setattr(logs, "_MAX_CACHED_KEYS", 2)
    monkeypatch.setattr(logs, "_string_items", {})
    monkeypatch.setattr(logs, "_key_fragments", {})
    lines = []
    for index in range(4):
        attributes: dict[str, fields.AttributeValue] = {
            "k8s.namespace.name": "shop",
            "server.address": f"host-{index % 2}.example",
            "n": index,
        }
        capsys.readouterr()
        log_decision(attributes, trace_id="ab", span_id="cd", name="egress CONNECT")
        lines.append(json.loads(capsys.readouterr().err))
    assert [line["server.address"] for line in lines] == ["host-0.example", "host-1.example"] * 2
    assert [line["n"] for line in lines] == [0, 1, 2, 3]
    assert len(logs._string_items) <= 2 and len(logs._key_fragments) <= 2
    assert all(list(line)[:3] == ["trace_id", "span_id", "span_name"] for line in lines)


def test_long_values_are_encoded_but_not_kept(recorder: MemoryRecorder, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    long_host = "h" * 1000 + ".example"
    record = recorder.open("GET", "10.0.0.1", 40030)
    record.decided(facts(target=long_host, host_header=long_host), allow())
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    assert span_to_line(span) == sdk_spans_to_lines([span])[0]
    assert json.loads(capsys.readouterr().err)["egress.host_header"] == long_host
    assert all(len(value) <= otlp_json._MAX_CACHED_VALUE for _, value in otlp_json._string_items)
    assert all(len(value) <= logs._MAX_CACHED_VALUE for _, value in logs._string_items)
