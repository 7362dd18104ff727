"""Attribute values at the edges of what OTLP can hold encode as the SDK's OTLP encoder writes them (the fast paths of
`otlp_json.attributes` skip its general dispatch for the common types: they must not change a value)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import orjson
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from egress_gateway.audit import otlp_json
from tests.audit.test_audit_otlp_json import sdk_objects


class Text(str):
    pass


class Pair(NamedTuple):
    first: int
    second: int


EDGES: dict[str, Any] = {
    "int64.max": 2**63 - 1,
    "int64.min": -(2**63),
    "zero": 0,
    "bool": True,
    "float": 0.000123,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "text": 'é ✓ "quoted" \\ \n\x00\u2028 \U0001f600',
    "str.subclass": Text("sub"),
    "tuple": ("h2", "http/1.1"),
    "tuple.empty": (),
    "tuple.subclass": Pair(1, 2),
    "list": [1, 2.5, "x", False],
    "range": range(3),
}


def test_edge_values_encode_as_the_sdk_encodes_them() -> None:
    span = ReadableSpan(
        "edges",
        context=SpanContext(1, 2, is_remote=False),
        resource=Resource.get_empty(),
        attributes=EDGES,
        instrumentation_scope=InstrumentationScope("edges"),
        start_time=1,
        end_time=2,
    )
    (reference,) = sdk_objects([span])
    ours = orjson.loads(orjson.dumps(otlp_json.attributes(EDGES)))
    assert ours == reference["attributes"]


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, b"bytes", {"a": 1}, None, object()])
def test_a_value_otlp_cannot_hold_is_refused(value: Any) -> None:
    with pytest.raises(otlp_json.UnsupportedValue):
        otlp_json.attributes({"key": value})
