"""The recorder builds each finished span itself: the SDK's limits still hold, and a disabled SDK is an error."""

from __future__ import annotations

import pytest

from egress_gateway.audit.spans import SPAN_LIMITS, SpanRecorder, build_tracer_provider
from tests.audit.conftest import MemoryRecorder, allow, facts


def test_events_beyond_the_limit_drop_the_oldest_and_are_counted(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40100)
    record.decided(facts(), allow())
    extra = (SPAN_LIMITS.max_events or 0) + 5
    for index in range(extra):
        record.event("client_hello", index=index)
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    assert len(span.events) == SPAN_LIMITS.max_events
    assert span.dropped_events == extra + 2 - len(span.events)  # + the decided and closed events
    assert span.events[-1].name == "closed"


def test_event_and_span_attributes_stay_within_the_limits(recorder: MemoryRecorder) -> None:
    record = recorder.open("CONNECT", "127.0.0.2", 40101)
    record.event("client_hello", **{f"k{index}": index for index in range(100)})
    record.set(**{f"extra_{index}": index for index in range(300)})
    record.close()
    (span,) = recorder.exporter.get_finished_spans()
    (hello, _closed) = span.events
    assert len(hello.attributes or {}) == SPAN_LIMITS.max_event_attributes
    assert hello.dropped_attributes == 100 - (SPAN_LIMITS.max_event_attributes or 0)
    assert len(span.attributes or {}) == SPAN_LIMITS.max_span_attributes
    assert span.dropped_attributes > 0


def test_an_sdk_disabled_by_environment_is_refused_not_silently_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    provider = build_tracer_provider([], max_queue_size=8)
    with pytest.raises(ValueError, match="OTEL_SDK_DISABLED"):
        SpanRecorder(provider)
