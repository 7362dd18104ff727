"""Finished SDK spans as OTLP/JSON objects (plain dicts, serialized by the trail writer with orjson).

Builds what `encode_spans` + protobuf's `MessageToDict(use_integers_for_enums=True)` build for the same span (the
JSON-lines trail's format, see `audit/jsonl.py`): proto3 defaults left out, 64-bit integers and nanosecond times as
strings, ids as hex, enums as integers, fields in field-number order. `tests/audit/test_audit_otlp_json.py` compares
the two on real spans. A value it cannot encode (an unknown type, an int outside int64) raises `UnsupportedValue`,
and the writer drops that one span, counted. Imports only the OpenTelemetry SDK's types; must not import the proxy.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind

# opentelemetry-proto's Span.SpanKind numbers (the SDK's enum starts at INTERNAL = 0, the proto at UNSPECIFIED = 0).
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_FLAG_HAS_IS_REMOTE = 0x100
_FLAG_IS_REMOTE = 0x200
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class UnsupportedValue(ValueError):
    """A span holds something the OTLP encoding has no form for."""


def any_value(value: Any) -> dict[str, Any]:
    """An attribute value as an OTLP/JSON `AnyValue`."""
    # Order matters: bool is an int, str is a Sequence (the SDK's `_encode_value` checks in this order too).
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise UnsupportedValue(f"integer {value} is outside int64")
        return {"intValue": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"doubleValue": value}
        return {"doubleValue": "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
    if value is None:
        return {}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode("ascii")} if value else {"bytesValue": ""}
    if isinstance(value, Sequence):
        values = [any_value(item) for item in value]
        return {"arrayValue": {"values": values} if values else {}}
    if isinstance(value, Mapping):
        pairs = [_key_value(str(k), v) for k, v in value.items()]
        return {"kvlistValue": {"values": pairs} if pairs else {}}
    raise UnsupportedValue(f"attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> dict[str, Any]:
    if key:
        return {"key": key, "value": any_value(value)}
    return {"value": any_value(value)}


def attributes(values: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not values:
        return []
    return [_key_value(key, value) for key, value in values.items()]


def resource(res: Resource) -> dict[str, Any]:
    attrs = attributes(res.attributes)
    return {"attributes": attrs} if attrs else {}


def scope(instrumentation: InstrumentationScope | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if instrumentation is None:
        return out
    if instrumentation.name:
        out["name"] = instrumentation.name
    if instrumentation.version:
        out["version"] = instrumentation.version
    attrs = attributes(instrumentation.attributes)
    if attrs:
        out["attributes"] = attrs
    return out


def _flags(parent: SpanContext | None) -> int:
    if parent is not None and parent.is_remote:
        return _FLAG_HAS_IS_REMOTE | _FLAG_IS_REMOTE
    return _FLAG_HAS_IS_REMOTE


def span(sdk_span: ReadableSpan) -> dict[str, Any]:
    """One span as an OTLP/JSON `Span` object (without its resource and scope)."""
    context = sdk_span.get_span_context()
    if context is None:
        raise UnsupportedValue("span without a context")
    out: dict[str, Any] = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    trace_state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
    if trace_state:
        out["traceState"] = trace_state
    parent = sdk_span.parent
    if parent:
        out["parentSpanId"] = f"{parent.span_id:016x}"
    if sdk_span.name:
        out["name"] = sdk_span.name
    out["kind"] = _KIND[sdk_span.kind]
    if sdk_span.start_time:
        out["startTimeUnixNano"] = str(sdk_span.start_time)
    if sdk_span.end_time:
        out["endTimeUnixNano"] = str(sdk_span.end_time)
    attrs = attributes(sdk_span.attributes)
    if attrs:
        out["attributes"] = attrs
    if sdk_span.dropped_attributes:
        out["droppedAttributesCount"] = sdk_span.dropped_attributes
    if sdk_span.events:
        out["events"] = [_event(event) for event in sdk_span.events]
    if sdk_span.dropped_events:
        out["droppedEventsCount"] = sdk_span.dropped_events
    if sdk_span.links:
        out["links"] = [_link(link) for link in sdk_span.links]
    if sdk_span.dropped_links:
        out["droppedLinksCount"] = sdk_span.dropped_links
    status: dict[str, Any] = {}
    if sdk_span.status.description:
        status["message"] = sdk_span.status.description
    if sdk_span.status.status_code.value:
        status["code"] = sdk_span.status.status_code.value
    out["status"] = status
    out["flags"] = _flags(parent)
    return out


def _event(event: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if event.timestamp:
        out["timeUnixNano"] = str(event.timestamp)
    if event.name:
        out["name"] = event.name
    attrs = attributes(event.attributes)
    if attrs:
        out["attributes"] = attrs
    if event.dropped_attributes:
        out["droppedAttributesCount"] = event.dropped_attributes
    return out


def _link(link: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": f"{link.context.trace_id:032x}",
        "spanId": f"{link.context.span_id:016x}",
    }
    attrs = attributes(link.attributes)
    if attrs:
        out["attributes"] = attrs
    if link.dropped_attributes:
        out["droppedAttributesCount"] = link.dropped_attributes
    out["flags"] = _flags(link.context)
    return out
