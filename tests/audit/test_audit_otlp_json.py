"""The direct OTLP/JSON encoder writes what the SDK's protobuf encoder + protobuf's JSON mapping write."""

from __future__ import annotations

import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from egress_gateway.audit import otlp_json
from egress_gateway.audit.jsonl import sdk_spans_to_lines, span_to_line, spans_to_lines
from egress_gateway.audit.otlp_json import UnsupportedValue
from egress_gateway.policy.decision import Reason
from tests.audit.conftest import MemoryRecorder, allow, deny, facts


def _same_lines(spans: list[ReadableSpan]) -> list[dict[str, object]]:
    direct = [span_to_line(span) for span in spans]  # the direct encoder alone, no fallback
    reference = sdk_spans_to_lines(spans)
    assert len(direct) == len(reference) == len(spans)
    assert [json.loads(line) for line in direct] == [json.loads(line) for line in reference]
    # Same keys in the same order too, so a byte-level diff of two trails shows only real differences.
    assert direct == reference
    # The dict form of the encoder says the same.
    for span, line in zip(spans, direct, strict=True):
        as_dict = otlp_json.span(span)
        as_dict["resource"] = otlp_json.resource(span.resource)
        as_dict["scope"] = otlp_json.scope(span.instrumentation_scope)
        assert json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False) == line
    return [json.loads(line) for line in direct]


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


def test_a_value_the_direct_encoder_does_not_know_falls_back_to_the_sdk_path() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("s") as span:
        span.set_attribute("ok", 1)
    finished = exporter.get_finished_spans()[0]
    finished._attributes = {"huge": 2**64}  # the SDK encoder logs and drops it
    with pytest.raises(UnsupportedValue):
        span_to_line(finished)
    assert spans_to_lines([finished]) == sdk_spans_to_lines([finished])
    provider.shutdown()
