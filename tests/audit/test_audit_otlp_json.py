"""The trail's lines (OTLP/JSON objects written by orjson) say what the SDK's protobuf encoder + protobuf's JSON
mapping say for the same spans; a span that cannot be encoded is dropped alone."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from egress_gateway.audit.jsonl import JsonLinesSpanExporter, span_to_line
from egress_gateway.policy.decision import Reason
from tests.audit.conftest import MemoryRecorder, allow, deny, facts, metric


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
                for link in obj.get("links", []):
                    _hex_ids(link)
                objects.append({**obj, "resource": resource, "scope": scope})
    return objects


def _same_lines(spans: list[ReadableSpan]) -> list[dict[str, Any]]:
    lines = [json.loads(span_to_line(span)) for span in spans]
    reference = sdk_objects(spans)
    assert lines == reference
    # Same keys in the same order too, so a diff of two trails shows only real differences.
    assert [list(line) for line in lines] == [list(obj) for obj in reference]
    return lines


def test_gateway_spans_encode_exactly_like_the_sdk_path(recorder: MemoryRecorder) -> None:
    tunnel = recorder.open("CONNECT", "127.0.0.2", 41000)
    tunnel.set(server_address="api.stripe.com", server_port=443, network_peer_address="93.184.216.34")
    tunnel.event("decided", duration_s=0.00012)
    tunnel.decided(facts(destination_ip="93.184.216.34"), allow())
    tunnel.set(tls=True, tls_client_server_name="api.stripe.com", tls_alpn="h2,http/1.1")
    tunnel.event("client_hello")
    tunnel.decided(facts(sni="api.stripe.com", destination_ip="93.184.216.34"), allow())
    tunnel.event("upstream_connected")
    tunnel.close(bytes_sent=517, bytes_received=4096)
    denied = recorder.open("CONNECT", "127.0.0.3", 41001)
    denied.decided(facts("evil.example.net"), deny())
    denied.close()
    request = recorder.open("GET", "::1", 0)
    request.decided(facts("example.com", 80, host_header="example.com"), deny(Reason.NO_POLICY, "no policy"))
    request.set(http_response_status_code=403, error="")
    request.close()

    lines = _same_lines(list(recorder.exporter.get_finished_spans()))
    assert [line["name"] for line in lines] == ["egress CONNECT", "egress CONNECT", "egress GET"]
    assert lines[1]["status"] == {"code": 2, "message": "no rule allows this destination"}


def test_every_value_shape_and_span_field_encodes_like_the_sdk_path() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t", "n": 3, "f": 0.5, "b": False}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("scope.one", "1.2.3", attributes={"scope.attr": "x"})
    bare = provider.get_tracer("scope.two")
    remote_parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "value"), ("other", "1")]),
    )
    linked = SpanContext(trace_id=1, span_id=2, is_remote=False)
    with tracer.start_as_current_span(
        "outer",
        context=trace.set_span_in_context(trace.NonRecordingSpan(remote_parent)),
        kind=SpanKind.CLIENT,
        links=[Link(linked, {"why": "because"}), Link(remote_parent)],
        attributes={
            "s": 'text é ✓ "quoted" \n',
            "empty": "",
            "zero": 0,
            "negative": -(2**63),
            "big": 2**63 - 1,
            "t": True,
            "f": False,
            "d": 1.0,
            "tiny": 1e-300,
            "nan": float("nan"),
            "inf": float("inf"),
            "ninf": float("-inf"),
            "strings": ["a", "b"],
            "ints": [1, 2],
            "bools": [True, False],
            "floats": [0.25],
            "none_list": [],
        },
    ) as outer:
        outer.add_event("plain")
        outer.add_event("with", {"k": 1, "l": ["x"]}, timestamp=123)
        with bare.start_as_current_span("inner", kind=SpanKind.INTERNAL) as inner:
            inner.set_status(Status(StatusCode.OK))
        outer.set_status(Status(StatusCode.ERROR, "failed"))
    with tracer.start_as_current_span("producer", kind=SpanKind.PRODUCER):
        pass
    with tracer.start_as_current_span("consumer", kind=SpanKind.CONSUMER) as consumer:
        consumer.set_status(Status(StatusCode.ERROR))
    spans = list(exporter.get_finished_spans())
    # The SDK groups lines by resource and scope; keep one scope per call so the line order is comparable.
    for group in (
        [s for s in spans if s.instrumentation_scope and s.instrumentation_scope.name == "scope.one"],
        [s for s in spans if s.instrumentation_scope and s.instrumentation_scope.name == "scope.two"],
    ):
        _same_lines(group)
    provider.shutdown()


def test_a_span_that_cannot_be_encoded_is_dropped_alone_and_counted(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for name, value in (("first", 1), ("huge", 2**64), ("last", 2)):  # OTLP has no integer beyond int64
        with tracer.start_as_current_span(name) as span:
            span.set_attribute("n", value)
    before = metric("egress_gateway_span_export_dropped_total", exporter="file", reason="encode_failed")
    trail = JsonLinesSpanExporter(tmp_path / "audit.jsonl")
    trail.export(exporter.get_finished_spans())
    trail.shutdown()
    provider.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == ["first", "last"]
    assert metric("egress_gateway_span_export_dropped_total", exporter="file", reason="encode_failed") == before + 1
