"""Connection records as OTLP/JSON objects (plain dicts; the trail writer encodes them with orjson): what the SDK's
OTLP encoder and protobuf's `MessageToDict(use_integers_for_enums=True)` give for the same span
(tests/audit/test_audit_otlp_json.py compares them). A value OTLP has no form for raises `UnsupportedValue`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.sdk.resources import Resource

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class UnsupportedValue(ValueError):
    """A span holds something the OTLP encoding has no form for."""


def any_value(value: Any) -> dict[str, Any]:
    """An attribute value (a primitive or a sequence of them, what OpenTelemetry attributes hold) as an OTLP/JSON
    `AnyValue`."""
    # Order matters: bool is an int, str is a Sequence (the SDK's `_encode_value` checks in this order too). A tuple
    # or list is none of them: the sequences records hold are looked at first, without the slower `Sequence` check.
    if isinstance(value, (tuple, list)):
        values = [any_value(item) for item in value]
        return {"arrayValue": {"values": values} if values else {}}
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
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return any_value(tuple(value))
    raise UnsupportedValue(f"attribute value of type {type(value).__name__}")


def attributes(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    # The primitives records hold inline, without `any_value`'s general dispatch (the trail thread's hottest loop).
    return [
        {
            "key": key,
            "value": {"stringValue": value}
            if (kind := type(value)) is str
            else {"boolValue": value}
            if kind is bool
            else {"intValue": str(value)}
            if kind is int and _INT64_MIN <= value <= _INT64_MAX
            else any_value(value),
        }
        for key, value in values.items()
    ]


def resource(res: Resource) -> dict[str, Any]:
    attrs = attributes(res.attributes)
    return {"attributes": attrs} if attrs else {}


def scope(name: str, version: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name} if name else {}
    if version:
        out["version"] = version
    return out


class FinishedRecord(NamedTuple):
    """One closed connection record: what the trail writes and what the OTLP exporters get, the same values."""

    trace_id: int
    span_id: int
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    dropped_attributes: int
    events: list[tuple[str, dict[str, Any], int, int]]  # name, attributes, time (ns), dropped attributes
    dropped_events: int
    error: str | None  # the status message of a denied connection (status ERROR), None for UNSET


class OpenedRecord(NamedTuple):
    """A connection's first decision, written to the trail at once (`open` record); its span line closes it."""

    trace_id: int
    span_id: int
    name: str
    time_ns: int
    attributes: dict[str, Any]


def open_object(record: OpenedRecord) -> dict[str, Any]:
    """The trail's `open` record: the ids of the span that will close it, the decision time, the attributes known
    then (client, identity, destination, decision, policy, rule), in the span line's OTLP/JSON forms."""
    return {
        "recordType": "open",
        "traceId": f"{record.trace_id:032x}",
        "spanId": f"{record.span_id:016x}",
        "name": record.name,
        "timeUnixNano": str(record.time_ns),
        "attributes": attributes(record.attributes),
    }


SPAN_KIND_SERVER = 2
FLAGS = 0x100  # HAS_IS_REMOTE without IS_REMOTE: a root span, no remote parent


def record_object(record: FinishedRecord, envelope: Mapping[str, Any]) -> dict[str, Any]:
    """The OTLP/JSON `Span` object of one record, plus `envelope` (its resource and scope)."""
    out: dict[str, Any] = {
        "traceId": f"{record.trace_id:032x}",
        "spanId": f"{record.span_id:016x}",
        "name": record.name,
        "kind": SPAN_KIND_SERVER,
        "startTimeUnixNano": str(record.start_ns),
        "endTimeUnixNano": str(record.end_ns),
    }
    if record.attributes:
        out["attributes"] = attributes(record.attributes)
    if record.dropped_attributes:
        out["droppedAttributesCount"] = record.dropped_attributes
    if record.events:
        out["events"] = [_event(*event) for event in record.events]
    if record.dropped_events:
        out["droppedEventsCount"] = record.dropped_events
    if record.error is None:
        out["status"] = {}
    else:
        out["status"] = {"message": record.error, "code": 2} if record.error else {"code": 2}
    out["flags"] = FLAGS
    out.update(envelope)
    return out


def _event(name: str, values: Mapping[str, Any], time_ns: int, dropped: int) -> dict[str, Any]:
    out: dict[str, Any] = {"timeUnixNano": str(time_ns), "name": name} if name else {"timeUnixNano": str(time_ns)}
    if values:
        out["attributes"] = attributes(values)
    if dropped:
        out["droppedAttributesCount"] = dropped
    return out
