"""One span per connection, checked through the SDK's in-memory exporter: names, attributes, events, status."""

from __future__ import annotations

import json

import pytest
import structlog
from opentelemetry.trace import SpanKind, StatusCode

from egress_gateway.audit.spans import build_resource
from egress_gateway.logging import configure_logging
from egress_gateway.policy.decision import Decision, PolicyRef, Reason
from tests.audit.conftest import SHOP, MemoryRecorder, allow, deny, facts, metric


def test_allowed_tunnel_is_one_span_with_semantic_convention_attributes(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40000)
    record.decided(facts(sni=None), allow())
    record.event("resolved", addresses="203.0.113.7")
    record.set(network_peer_address="203.0.113.7", server_address="api.stripe.com", server_port=443)
    record.event("upstream_connected")
    record.event("client_hello", sni="api.stripe.com")
    record.set(tls_client_server_name="api.stripe.com", egress_tls=True)
    record.close(bytes_sent=517, bytes_received=4096)

    (span,) = recorder.exporter.get_finished_spans()
    assert span.name == "egress CONNECT"
    assert span.kind is SpanKind.SERVER
    attrs = dict(span.attributes or {})
    assert attrs["client.address"] == "127.0.0.2"
    assert attrs["client.port"] == 40000
    assert attrs["server.address"] == "api.stripe.com"
    assert attrs["server.port"] == 443
    assert attrs["network.peer.address"] == "203.0.113.7"
    assert attrs["tls.client.server_name"] == "api.stripe.com"
    assert attrs["http.request.method"] == "CONNECT"
    assert attrs["k8s.namespace.name"] == "shop"
    assert attrs["k8s.pod.name"] == "web-7d9f"
    assert attrs["k8s.pod.label.app"] == "web"
    assert attrs["k8s.namespace.label.team"] == "payments"
    assert attrs["egress.decision"] == "allow"
    assert attrs["egress.reason"] == "allowed_by_rule"
    assert attrs["egress.policy"] == "EgressPolicy/shop/payments"
    assert attrs["egress.policy.version"] == "3"
    assert attrs["egress.rule"] == "stripe"
    assert attrs["egress.matched"] == "api.stripe.com"
    assert attrs["egress.would_deny"] is False
    assert attrs["egress.logged"] is False
    assert attrs["egress.tls"] is True
    assert attrs["egress.bytes_sent"] == 517
    assert attrs["egress.bytes_received"] == 4096
    assert [e.name for e in span.events] == ["decided", "resolved", "upstream_connected", "client_hello", "closed"]
    times = [e.timestamp for e in span.events]
    assert times == sorted(times)
    assert span.start_time is not None and span.end_time is not None
    assert span.start_time <= times[0] and times[-1] <= span.end_time
    assert span.status.status_code is StatusCode.UNSET


def test_denied_connection_has_status_error_with_the_reason(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40001)
    record.decided(facts("evil.example.net"), deny())
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "no rule allows this destination"
    attrs = dict(span.attributes or {})
    assert attrs["egress.decision"] == "deny"
    assert attrs["egress.reason"] == "no_matching_rule"
    assert attrs["server.address"] == "evil.example.net"


def test_plain_http_request_span_is_named_after_its_method(recorder: MemoryRecorder) -> None:
    record = recorder.open("GET", "127.0.0.3", 40002)
    record.decided(facts("example.org", 80, host_header="example.org"), allow("web", "example.org"))
    record.set(http_response_status_code=200)
    record.close(bytes_sent=80, bytes_received=1200)
    (span,) = recorder.exporter.get_finished_spans()
    assert span.name == "egress GET"
    attrs = dict(span.attributes or {})
    assert attrs["http.request.method"] == "GET"
    assert attrs["http.response.status_code"] == 200
    assert attrs["egress.host_header"] == "example.org"


def test_a_later_decision_replaces_the_earlier_one_and_both_are_events(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40003)
    record.decided(facts(), allow())
    record.decided(facts(sni="evil.example.net"), deny(Reason.SNI_MISMATCH, "SNI does not match CONNECT"))
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["egress.decision"] == "deny"
    assert attrs["egress.reason"] == "sni_mismatch"
    assert "egress.rule" not in attrs  # the CONNECT decision's rule does not linger
    assert attrs["tls.client.server_name"] == "evil.example.net"
    decided = [e for e in span.events if e.name == "decided"]
    assert [dict(e.attributes or {})["egress.decision"] for e in decided] == ["allow", "deny"]
    assert span.status.status_code is StatusCode.ERROR


def test_audit_mode_would_deny_is_recorded_with_its_policy_and_rule(recorder: MemoryRecorder) -> None:
    audit_policy = PolicyRef("EgressPolicy", "shop", "lockdown", "7")
    decision = Decision(
        allowed=True,
        reason=Reason.NO_POLICY,
        message="allowed: default action",
        would_deny=True,
        audit_reason=Reason.NO_MATCHING_RULE,
        audit_policy=audit_policy,
        audit_rule=None,
    )
    record = recorder.open("CONNECT", "127.0.0.2", 40004)
    record.decided(facts("pypi.org"), decision)
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["egress.decision"] == "allow"
    assert attrs["egress.would_deny"] is True
    assert attrs["egress.would_deny.reason"] == "no_matching_rule"
    assert attrs["egress.would_deny.policy"] == "EgressPolicy/shop/lockdown"
    assert attrs["egress.would_deny.policy.version"] == "7"
    assert span.status.status_code is StatusCode.UNSET


def test_secrets_passed_by_mistake_are_never_recorded(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40005)
    record.set(proxy_authorization="Basic c2VjcmV0OnNlY3JldA==", token="eyJhbGciOi", server_port=443)
    record.event("client_hello", authorization="Bearer abc", sni="x.example.com")
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    dumped = json.dumps({"a": dict(span.attributes or {}), "e": [dict(e.attributes or {}) for e in span.events]})
    assert "c2VjcmV0" not in dumped and "eyJhbGciOi" not in dumped and "Bearer" not in dumped
    assert dict(span.attributes or {})["server.port"] == 443


def test_close_is_idempotent_and_late_calls_are_ignored(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40006)
    record.close(bytes_sent=1)
    record.close(bytes_sent=2)
    record.decided(facts(), deny())
    record.set(server_port=1)
    record.event("resolved")
    (span,) = recorder.exporter.get_finished_spans()
    assert dict(span.attributes or {})["egress.bytes_sent"] == 1


def test_recorder_never_raises_into_the_data_path(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40007)
    record.decided(None, None)  # type: ignore[arg-type]
    record.event("resolved", weird=object())
    record.set(thing=object())
    record.close(bytes_sent="lots")  # type: ignore[arg-type]
    assert len(recorder.exporter.get_finished_spans()) == 1


def test_resource_names_the_gateway_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "egress-gateway-0")
    monkeypatch.setenv("POD_NAMESPACE", "egress-system")
    monkeypatch.setenv("POD_UID", "0b6c8f0e-1111-2222-3333-444455556666")
    attrs = dict(build_resource().attributes)
    assert attrs["service.name"] == "egress-gateway"
    assert attrs["service.version"]
    assert attrs["service.instance.id"] == "0b6c8f0e-1111-2222-3333-444455556666"
    assert attrs["k8s.pod.name"] == "egress-gateway-0"
    assert attrs["k8s.namespace.name"] == "egress-system"


def test_one_json_log_line_per_decision_with_trace_and_span_ids(
    recorder: MemoryRecorder, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    try:
        record = recorder.open("CONNECT", "127.0.0.2", 40008)
        record.set(proxy_authorization="Basic c2VjcmV0OnNlY3JldA==")
        record.decided(facts(), allow())
        record.decided(facts(sni="evil.example.net"), deny(Reason.SNI_MISMATCH, "SNI mismatch"))
        record.close()
        structlog.get_logger("x").info("proxy_note", proxy_authorization="Basic c2VjcmV0", value="Bearer abc")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    decisions = [line for line in lines if line["event"] == "egress_decision"]
    assert len(decisions) == 2
    (span,) = recorder.exporter.get_finished_spans()
    for line in decisions:
        assert line["trace_id"] == format(span.context.trace_id, "032x")
        assert line["span_id"] == format(span.context.span_id, "016x")
        assert line["k8s.namespace.name"] == "shop"
        assert line["server.address"] == "api.stripe.com"
        assert line["level"] == "info"
        assert "timestamp" in line
    assert [line["egress.decision"] for line in decisions] == ["allow", "deny"]
    assert "c2VjcmV0" not in err and "Bearer abc" not in err


def test_a_tunnel_whose_sni_confirms_its_connect_writes_one_line_and_a_deny_is_written_at_once(
    recorder: MemoryRecorder, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")

    def decision_lines() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        return [line for line in lines if line["event"] == "egress_decision"]

    try:
        tunnel = recorder.open("CONNECT", "127.0.0.2", 40009)
        tunnel.decided(facts(), allow())
        assert decision_lines() == []  # the allowing CONNECT line waits for the ClientHello
        tunnel.set(tls=True, tls_client_server_name="api.stripe.com")
        tunnel.event("client_hello")
        tunnel.decided(facts(sni="api.stripe.com"), allow())
        (line,) = decision_lines()  # the SNI decision confirms it: one line, with the SNI
        assert line["tls.client.server_name"] == "api.stripe.com" and line["egress.decision"] == "allow"
        tunnel.close()
        assert decision_lines() == []

        denied = recorder.open("CONNECT", "127.0.0.2", 40010)
        denied.decided(facts("evil.example.net"), deny())
        (line,) = decision_lines()  # a deny is in the log at decision time, before the close
        assert line["egress.decision"] == "deny"
        denied.close()
    finally:
        structlog.reset_defaults()


def test_warning_level_silences_decision_lines(recorder: MemoryRecorder, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    try:
        record = recorder.open("CONNECT", "127.0.0.2", 40009)
        record.decided(facts(), allow())
        record.close()
    finally:
        structlog.reset_defaults()
    assert "egress_decision" not in capsys.readouterr().err


def test_metrics_count_decisions_tunnels_bytes_and_latency(recorder: MemoryRecorder) -> None:
    before_allow = metric(
        "egress_gateway_decisions_total", namespace="shop", decision="allow", reason="allowed_by_rule"
    )
    before_deny = metric(
        "egress_gateway_decisions_total", namespace="_unknown", decision="deny", reason="unknown_client"
    )
    before_sent = metric("egress_gateway_bytes_total", namespace="shop", direction="sent")
    before_latency = metric("egress_gateway_decision_duration_seconds_count")
    tunnels = metric("egress_gateway_active_tunnels")

    record = recorder.open("CONNECT", "127.0.0.2", 40010)
    assert metric("egress_gateway_active_tunnels") == tunnels + 1
    record.decided(facts(), allow())
    record.close(bytes_sent=100, bytes_received=5)
    unknown = recorder.open("CONNECT", "127.0.0.9", 40011)
    unknown.decided(facts(identity=None), deny(Reason.UNKNOWN_CLIENT, "unknown client"))
    unknown.close()

    assert metric("egress_gateway_active_tunnels") == tunnels
    assert (
        metric("egress_gateway_decisions_total", namespace="shop", decision="allow", reason="allowed_by_rule")
        == before_allow + 1
    )
    assert (
        metric("egress_gateway_decisions_total", namespace="_unknown", decision="deny", reason="unknown_client")
        == before_deny + 1
    )
    assert metric("egress_gateway_bytes_total", namespace="shop", direction="sent") == before_sent + 100
    assert metric("egress_gateway_decision_duration_seconds_count") == before_latency + 2


def test_identity_is_recorded_once_even_for_an_unknown_client(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.9", 40012)
    record.decided(facts(identity=None), deny(Reason.UNKNOWN_CLIENT, "unknown client"))
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert "k8s.namespace.name" not in attrs
    assert attrs["egress.reason"] == "unknown_client"
    assert SHOP.namespace == "shop"


def test_a_decided_event_from_the_proxy_merges_into_the_decision_event(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40013)
    record.event("decided", duration_s=0.0004)
    record.decided(facts(), allow())
    record.event("closed")
    record.close(bytes_sent=3)
    (span,) = recorder.exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["decided", "closed"]
    decided = dict(span.events[0].attributes or {})
    assert decided["duration_s"] == 0.0004 and decided["egress.decision"] == "allow"


def test_a_repeated_identical_decision_counts_once_but_a_changed_one_counts(recorder: MemoryRecorder) -> None:
    allowed = {"namespace": "shop", "decision": "allow", "reason": "allowed_by_rule"}
    mismatch = {"namespace": "shop", "decision": "deny", "reason": "sni_mismatch"}
    before = metric("egress_gateway_decisions_total", **allowed), metric("egress_gateway_decisions_total", **mismatch)
    same = recorder.open("CONNECT", "127.0.0.2", 40014)
    same.decided(facts(), allow())
    same.decided(facts(sni="api.stripe.com"), allow())
    same.close()
    changed = recorder.open("CONNECT", "127.0.0.2", 40015)
    changed.decided(facts(), allow())
    changed.decided(facts(sni="evil.example.net"), deny(Reason.SNI_MISMATCH, "SNI mismatch"))
    changed.close()
    assert metric("egress_gateway_decisions_total", **allowed) == before[0] + 2
    assert metric("egress_gateway_decisions_total", **mismatch) == before[1] + 1


def test_reporting_the_pinned_ip_marks_the_resolved_stage_once(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40016)
    record.set(network_peer_address="203.0.113.7")
    record.decided(facts(destination_ip="203.0.113.7"), allow())
    record.set(network_peer_address="203.0.113.7")
    record.event("resolved")
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    assert [e.name for e in span.events] == ["resolved", "decided", "closed"]
    assert dict(span.events[0].attributes or {}) == {"network.peer.address": "203.0.113.7"}
