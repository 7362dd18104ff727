"""A direct encoder from finished SDK spans to OTLP/JSON, one pass, no protobuf round trip: `span()` builds the
object, `span_json_open()` writes the same object straight as JSON text (what the trail file uses: about 8x faster
than the SDK path, 2x faster than building dicts for `json.dumps`).

Writes what `encode_spans` + protobuf's `MessageToDict(use_integers_for_enums=True)` write for the same span (the
JSON-lines trail's format, see `audit/jsonl.py`): proto3 defaults left out, 64-bit integers and nanosecond times as
strings, ids as hex, enums as integers, fields in field-number order. `tests/audit/test_audit_otlp_json.py` compares
the two on real spans. Anything this encoder does not know (a value type, an int outside int64) raises
`UnsupportedValue` so the caller can fall back to the SDK path. Imports only the OpenTelemetry SDK's types; must not
import the proxy.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring as _string  # the C encoder json.dumps uses (no ASCII escaping)
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status

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
    """A span holds something the SDK encoder would encode differently or drop; use the SDK path."""


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


# ---- the same objects written straight to JSON text (what the trail file needs, without building dicts) --------
# Must produce exactly `json.dumps(span(...), separators=(",", ":"), ensure_ascii=False)`; the tests compare both
# with the SDK path byte for byte.


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _value_json(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return '{"stringValue":' + _string(value) + "}"
    if kind is bool:
        return '{"boolValue":true}' if value else '{"boolValue":false}'
    if kind is int and _INT64_MIN <= value <= _INT64_MAX:
        return '{"intValue":"' + str(value) + '"}'
    if kind is float and math.isfinite(value):
        return '{"doubleValue":' + repr(value) + "}"
    return _dumps(any_value(value))  # everything else (and every error) the slow, general way


_MAX_CACHED_KEYS = 4096
_MAX_CACHED_ITEMS = 8192
_MAX_CACHED_VALUE = 256
# attribute key -> '{"key":"<key>","value":' (the vocabulary is small: names from audit/fields.py and label keys)
_key_openings: dict[str, str] = {}
_TRUE = '{"boolValue":true}}'
_FALSE = '{"boolValue":false}}'
# (key, str value) -> the whole `{"key":...,"value":{"stringValue":...}}` item: most string attributes (namespace,
# pod, labels, destination, decision, policy, rule, message) repeat from one connection to the next.
_string_items: dict[tuple[str, str], str] = {}


def _key_opening(key: str) -> str:
    opening = '{"key":' + _string(key) + ',"value":' if key else '{"value":'
    if len(_key_openings) >= _MAX_CACHED_KEYS:
        _key_openings.clear()
    _key_openings[key] = opening
    return opening


def _string_item(key: str, value: str) -> str:
    item = (_key_openings.get(key) or _key_opening(key)) + '{"stringValue":' + _string(value) + "}}"
    if len(value) <= _MAX_CACHED_VALUE:  # long values (a client's odd Host header) do not repeat; nor fill memory
        if len(_string_items) >= _MAX_CACHED_ITEMS:
            _string_items.clear()
        _string_items[key, value] = item
    return item


def _attributes_json(values: Mapping[str, Any]) -> str:
    items = _string_items
    openings = _key_openings
    parts = []
    for key, value in values.items():
        kind = type(value)
        if kind is str:
            parts.append(items.get((key, value)) or _string_item(key, value))
        elif kind is bool:
            parts.append((openings.get(key) or _key_opening(key)) + (_TRUE if value else _FALSE))
        else:
            parts.append((openings.get(key) or _key_opening(key)) + _value_json(value) + "}")
    return ",".join(parts)


def _event_json(event: Any) -> str:
    timestamp, name, attrs = event.timestamp, event.name, event.attributes
    if timestamp and name and type(attrs) is dict:  # every event the gateway records (a plain dict drops nothing)
        if attrs:
            return f'{{"timeUnixNano":"{timestamp}","name":{_string(name)},"attributes":[{_attributes_json(attrs)}]}}'
        return f'{{"timeUnixNano":"{timestamp}","name":{_string(name)}}}'
    members = []
    if event.timestamp:
        members.append('"timeUnixNano":"' + str(event.timestamp) + '"')
    if event.name:
        members.append('"name":' + _string(event.name))
    if event.attributes:
        members.append('"attributes":[' + _attributes_json(event.attributes) + "]")
    if event.dropped_attributes:
        members.append('"droppedAttributesCount":' + str(event.dropped_attributes))
    return "{" + ",".join(members) + "}"


def _status_json(status: Status) -> str:
    code = status.status_code.value
    if status.description:
        message = '"message":' + _string(status.description)
        return "{" + message + ',"code":' + str(code) + "}" if code else "{" + message + "}"
    return '{"code":' + str(code) + "}" if code else "{}"


def span_json_open(sdk_span: ReadableSpan) -> str:
    """`span(sdk_span)` as JSON text without its closing brace (the caller appends resource and scope)."""
    context = sdk_span.get_span_context()
    if context is None:
        raise UnsupportedValue("span without a context")
    name, start, end = sdk_span.name, sdk_span.start_time, sdk_span.end_time
    attributes, events = sdk_span.attributes, sdk_span.events
    if (
        name
        and start
        and end
        and attributes
        and events
        and sdk_span.kind is SpanKind.SERVER
        and sdk_span.parent is None
        and not context.trace_state
        and not sdk_span.links
        and not sdk_span.dropped_attributes
        and not sdk_span.dropped_events
        and not sdk_span.dropped_links
    ):
        # Every span the gateway records has this shape: the same members as below, in one piece.
        return (
            f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}","name":{_string(name)},'
            f'"kind":2,"startTimeUnixNano":"{start}","endTimeUnixNano":"{end}",'
            f'"attributes":[{_attributes_json(attributes)}],"events":[{",".join([_event_json(e) for e in events])}],'
            f'"status":{_status_json(sdk_span.status)},"flags":{_FLAG_HAS_IS_REMOTE}'
        )
    members = [f'{{"traceId":"{context.trace_id:032x}","spanId":"{context.span_id:016x}"']
    if context.trace_state:
        trace_state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
        if trace_state:
            members.append('"traceState":' + _string(trace_state))
    parent = sdk_span.parent
    if parent:
        members.append(f'"parentSpanId":"{parent.span_id:016x}"')
    if sdk_span.name:
        members.append('"name":' + _string(sdk_span.name))
    members.append('"kind":' + str(_KIND[sdk_span.kind]))
    if sdk_span.start_time:
        members.append('"startTimeUnixNano":"' + str(sdk_span.start_time) + '"')
    if sdk_span.end_time:
        members.append('"endTimeUnixNano":"' + str(sdk_span.end_time) + '"')
    attributes = sdk_span.attributes
    if attributes:
        members.append('"attributes":[' + _attributes_json(attributes) + "]")
    if sdk_span.dropped_attributes:
        members.append('"droppedAttributesCount":' + str(sdk_span.dropped_attributes))
    events = sdk_span.events
    if events:
        members.append('"events":[' + ",".join([_event_json(event) for event in events]) + "]")
    if sdk_span.dropped_events:
        members.append('"droppedEventsCount":' + str(sdk_span.dropped_events))
    links = sdk_span.links
    if links:
        members.append('"links":' + _dumps([_link(link) for link in links]))
    if sdk_span.dropped_links:
        members.append('"droppedLinksCount":' + str(sdk_span.dropped_links))
    members.append('"status":' + _status_json(sdk_span.status))
    members.append('"flags":' + str(_flags(parent)))
    return ",".join(members)
