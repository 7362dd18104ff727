"""The SDK's span limits hold for every record (the trail says what was dropped), and a disabled SDK is an error."""

import json
from pathlib import Path
from typing import Any

import pytest

from egress_gateway.audit import build_recorder
from egress_gateway.audit.recorder import ConnectionRecord
from egress_gateway.audit.spans import SPAN_LIMITS, SpanRecorder, build_tracer_provider
from egress_gateway.settings import AuditSettings, Settings
from tests.audit.conftest import allow, facts, span_lines


def _trail_line(tmp_path: Path, drive: Any) -> dict[str, Any]:
    trail = tmp_path / "audit.jsonl"
    recorder = build_recorder(Settings(audit=AuditSettings(file=trail)))
    record: ConnectionRecord = recorder.open("CONNECT", "127.0.0.2", 40100)
    drive(record)
    record.close()
    recorder.shutdown()
    (line,) = span_lines(trail.read_text())
    return dict(json.loads(line))


def test_events_beyond_the_limit_drop_the_oldest_and_are_counted(tmp_path: Path) -> None:
    extra = (SPAN_LIMITS.max_events or 0) + 5

    def drive(record: ConnectionRecord) -> None:
        record.decided(facts(), allow())
        for index in range(extra):
            record.event("client_hello", index=index)

    line = _trail_line(tmp_path, drive)
    assert len(line["events"]) == SPAN_LIMITS.max_events
    assert line["droppedEventsCount"] == extra + 2 - len(line["events"])  # + the decided and closed events
    assert line["events"][-1]["name"] == "closed"


def test_event_and_span_attributes_stay_within_the_limits(tmp_path: Path) -> None:
    def drive(record: ConnectionRecord) -> None:
        record.event("client_hello", **{f"k{index}": index for index in range(100)})
        record.set(**{f"extra_{index}": index for index in range(300)})

    line = _trail_line(tmp_path, drive)
    hello, _closed = line["events"]
    assert len(hello["attributes"]) == SPAN_LIMITS.max_event_attributes
    assert hello["droppedAttributesCount"] == 100 - (SPAN_LIMITS.max_event_attributes or 0)
    assert len(line["attributes"]) == SPAN_LIMITS.max_span_attributes
    assert line["droppedAttributesCount"] > 0


def test_an_sdk_disabled_by_environment_is_refused_not_silently_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    provider = build_tracer_provider([], max_queue_size=8)
    with pytest.raises(ValueError, match="OTEL_SDK_DISABLED"):
        SpanRecorder(provider)
