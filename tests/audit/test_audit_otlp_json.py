"""The trail's lines say what the OTLP exporters send for the same records: each line equals the SDK's OTLP
protobuf encoding of the span the recorder handed to the SDK, through protobuf's JSON mapping. A record that cannot
be encoded is dropped alone."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from egress_gateway import __version__
from egress_gateway.audit import otlp_json
from egress_gateway.audit.jsonl import TrailWriter
from egress_gateway.audit.otlp_json import FinishedRecord
from egress_gateway.audit.spans import TRACER_NAME, SpanRecorder, build_resource, build_tracer_provider
from egress_gateway.policy.decision import Reason
from tests.audit.conftest import allow, deny, facts, metric


def _hex_ids(obj: dict[str, Any]) -> None:
    # protobuf's JSON mapping writes `bytes` as base64; OTLP/JSON requires trace and span ids as hex.
    for key in ("traceId", "spanId", "parentSpanId"):
        if isinstance(obj.get(key), str):
            obj[key] = base64.b64decode(obj[key]).hex()


def sdk_objects(spans: Sequence[ReadableSpan]) -> list[dict[str, Any]]:
    """The reference: the SDK's OTLP protobuf encoder and protobuf's JSON mapping."""
    objects: list[dict[str, Any]] = []
    for resource_spans in encode_spans(spans).resource_spans:
        resource = MessageToDict(resource_spans.resource, use_integers_for_enums=True)
        for scope_spans in resource_spans.scope_spans:
            scope = MessageToDict(scope_spans.scope, use_integers_for_enums=True)
            for span in scope_spans.spans:
                obj = MessageToDict(span, use_integers_for_enums=True)
                _hex_ids(obj)
                objects.append({**obj, "resource": resource, "scope": scope})
    return objects


def spans_of(trail: Path) -> list[dict[str, Any]]:
    """The trail's span lines without their chain seal (tests/audit/test_audit_chain.py checks that)."""
    lines = [json.loads(line) for line in trail.read_bytes().splitlines()]
    spans = [line for line in lines if "recordType" not in line]
    for line in spans:
        assert list(line)[-1] == "chain"
        del line["chain"]
    return spans


def _both(path: Path) -> tuple[SpanRecorder, InMemorySpanExporter]:
    resource = build_resource()
    provider = build_tracer_provider([], max_queue_size=64, resource=resource)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    envelope = {"resource": otlp_json.resource(resource), "scope": otlp_json.scope(TRACER_NAME, __version__)}
    return SpanRecorder(provider, TrailWriter(path, max_queue_size=64, envelope=envelope)), memory


def test_trail_lines_are_what_the_otlp_exporters_send(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    recorder, memory = _both(trail)
    tunnel = recorder.open("CONNECT", "127.0.0.2", 41000)
    tunnel.set(server_address="api.stripe.com", server_port=443, network_peer_address="93.184.216.34")
    tunnel.event("decided", duration_s=0.00012)
    tunnel.decided(facts(destination_ip="93.184.216.34"), allow())
    tunnel.set(tls=True, tls_client_server_name="api.stripe.com", tls_alpn=("h2", "http/1.1"), tls_ech=False)
    tunnel.event("client_hello", odd='é ✓ "quoted" \n\x00', ratio=0.5, big=-(2**63), flag=False)
    tunnel.decided(facts(sni="api.stripe.com", destination_ip="93.184.216.34"), allow())
    tunnel.event("upstream_connected")
    tunnel.close(bytes_sent=517, bytes_received=4096)
    denied = recorder.open("CONNECT", "127.0.0.3", 41001)
    denied.decided(facts("evil.example.net"), deny())
    denied.close()
    request = recorder.open("GET", "::1", 0)
    request.decided(facts("example.com", 80, host_header="caf\udcff.example"), deny(Reason.NO_POLICY, "no policy"))
    request.set(http_response_status_code=403, error="")
    request.close()
    noisy = recorder.open("CONNECT", "127.0.0.4", 41002)  # beyond the SDK's limits: 64 events, 64 event attributes
    for index in range(70):
        noisy.event("tick", **{f"k{n}": n for n in range(index % 3 * 40)})
    noisy.close()
    recorder.shutdown()

    lines = spans_of(trail)
    reference = sdk_objects(memory.get_finished_spans())
    assert len(lines) == 4
    # The record keeps the newest 64 events and 64 attributes per event, as the SDK would, and hands the SDK what
    # it kept: only the trail can say how many were dropped.
    assert lines[3].pop("droppedEventsCount") == 70 + 1 - 64
    assert sum(event.pop("droppedAttributesCount", 0) for event in lines[3]["events"]) > 0
    assert lines == reference
    assert [list(line) for line in lines] == [list(obj) for obj in reference]  # the same member order too
    assert [line["name"] for line in lines] == ["egress CONNECT", "egress CONNECT", "egress GET", "egress CONNECT"]
    assert lines[1]["status"] == {"code": 2, "message": "no rule allows this destination"}
    tunnel_attributes = {a["key"]: a["value"] for a in lines[0]["attributes"]}
    assert tunnel_attributes["egress.tls_alpn"] == {
        "arrayValue": {"values": [{"stringValue": "h2"}, {"stringValue": "http/1.1"}]}
    }
    assert tunnel_attributes["egress.tls_ech"] == {"boolValue": False}


def test_a_record_that_cannot_be_encoded_is_dropped_alone_and_counted(tmp_path: Path) -> None:
    def record(name: str, value: int) -> FinishedRecord:
        return FinishedRecord(1, 2, name, 10, 20, {"n": value}, 0, [], 0, None)

    before = metric("egress_gateway_span_export_dropped_total", exporter="file", reason="encode_failed")
    writer = TrailWriter(tmp_path / "audit.jsonl", max_queue_size=8, envelope={})
    for name, value in (("first", 1), ("huge", 2**64), ("last", 2)):  # OTLP has no integer beyond int64
        writer.submit(record(name, value))
    writer.shutdown()
    lines = spans_of(tmp_path / "audit.jsonl")
    assert [line["name"] for line in lines] == ["first", "last"]
    assert metric("egress_gateway_span_export_dropped_total", exporter="file", reason="encode_failed") == before + 1
