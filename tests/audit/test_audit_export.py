"""Exporters: the JSON-lines trail format, rotation, bounded queues, counted drops, unreachable OTLP endpoints."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from egress_gateway.audit import build_recorder, spans
from egress_gateway.audit.spans import SpanRecorder, build_tracer_provider, otlp_http_traces_url
from egress_gateway.logging import configure_logging
from egress_gateway.settings import AuditSettings, Settings
from tests.audit.conftest import allow, deny, facts, metric, span_lines


def _file_recorder(path: Path) -> SpanRecorder:
    return build_recorder(Settings(audit=AuditSettings(file=path)))


def _any_value(attributes: list[dict[str, object]], key: str) -> dict[str, object]:
    for item in attributes:
        if item["key"] == key:
            return item["value"]  # type: ignore[return-value]
    raise KeyError(key)


def test_trail_file_has_one_otlp_json_span_per_line(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    recorder = _file_recorder(trail)
    ok = recorder.open("CONNECT", "127.0.0.2", 41000)
    ok.decided(facts(destination_ip="203.0.113.7"), allow())
    ok.event("upstream_connected")
    ok.close(bytes_sent=10, bytes_received=20)
    bad = recorder.open("CONNECT", "127.0.0.2", 41001)
    bad.decided(facts("evil.example.net"), deny())
    bad.close()
    trace_ids = {ok.trace_id, bad.trace_id}  # type: ignore[attr-defined]
    recorder.shutdown()

    lines = span_lines(trail.read_text())
    assert len(lines) == 2
    spans = [json.loads(line) for line in lines]
    assert {s["traceId"] for s in spans} == trace_ids
    for span in spans:
        assert len(span["traceId"]) == 32 and int(span["traceId"], 16)
        assert len(span["spanId"]) == 16 and int(span["spanId"], 16)
        assert span["name"] == "egress CONNECT"
        assert span["kind"] == 2  # SPAN_KIND_SERVER, as an integer per OTLP/JSON
        assert int(span["startTimeUnixNano"]) <= int(span["endTimeUnixNano"])
        resource = span["resource"]["attributes"]
        assert _any_value(resource, "service.name") == {"stringValue": "egress-gateway"}
        assert "service.instance.id" in {a["key"] for a in resource}
        assert span["scope"]["name"] == "egress_gateway.audit"
    allowed = next(s for s in spans if s["traceId"] == ok.trace_id)  # type: ignore[attr-defined]
    denied = next(s for s in spans if s["traceId"] == bad.trace_id)  # type: ignore[attr-defined]
    assert _any_value(allowed["attributes"], "server.port") == {"intValue": "443"}
    assert _any_value(allowed["attributes"], "network.peer.address") == {"stringValue": "203.0.113.7"}
    assert _any_value(allowed["attributes"], "egress.would_deny") == {"boolValue": False}
    assert [e["name"] for e in allowed["events"]] == ["decided", "upstream_connected", "closed"]
    assert "code" not in allowed.get("status", {})  # UNSET
    assert denied["status"] == {"code": 2, "message": "no rule allows this destination"}


def test_trail_file_follows_external_rotation(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    recorder = _file_recorder(trail)
    recorder.open("CONNECT", "127.0.0.2", 1).close()
    recorder.force_flush()
    trail.rename(tmp_path / "audit.jsonl.1")
    recorder.open("CONNECT", "127.0.0.2", 2).close()
    recorder.shutdown()
    assert len((tmp_path / "audit.jsonl.1").read_text().splitlines()) == 1
    assert len(span_lines(trail.read_text())) == 1


def test_bad_trail_path_fails_at_startup_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"audit.file .*missing.* cannot be opened"):
        build_recorder(Settings(audit=AuditSettings(file=tmp_path / "missing" / "audit.jsonl")))


def test_a_full_trail_queue_drops_new_records_counts_them_and_never_blocks(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    recorder = build_recorder(Settings(audit=AuditSettings(file=trail, max_queue_size=8)))
    before = metric("egress_gateway_span_export_dropped_total", exporter="file", reason="queue_full")
    for port in range(50):  # the writer thread wakes at most once a second: the queue of 8 overflows
        recorder.open("CONNECT", "127.0.0.2", port).close()
    dropped = metric("egress_gateway_span_export_dropped_total", exporter="file", reason="queue_full") - before
    recorder.shutdown()
    written = len(span_lines(trail.read_text()))
    assert dropped >= 1 and written >= 8 and written + dropped == 50


def test_otlp_http_endpoint_gets_the_traces_path() -> None:
    assert otlp_http_traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert otlp_http_traces_url("https://otel.example/custom/v1/traces") == "https://otel.example/custom/v1/traces"
    with pytest.raises(ValueError, match="expected a URL"):
        otlp_http_traces_url("collector:4318")


class _BlockedExporter(SpanExporter):
    """An exporter stuck on a slow backend until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(30)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_full_queue_drops_spans_counts_them_and_never_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    stuck = _BlockedExporter()
    recorder = SpanRecorder(build_tracer_provider([("stuck", stuck)], max_queue_size=4))
    before = metric("egress_gateway_span_export_dropped_total", exporter="stuck", reason="queue_full")
    started = time.monotonic()
    for port in range(200):
        record = recorder.open("CONNECT", "127.0.0.2", port)
        record.decided(facts(), allow())
        record.close()
    elapsed = time.monotonic() - started
    dropped = metric("egress_gateway_span_export_dropped_total", exporter="stuck", reason="queue_full") - before
    stuck.release.set()
    recorder.shutdown()
    assert elapsed < 2.0, f"200 connections took {elapsed:.2f}s with a stuck exporter"
    assert dropped >= 200 - 4 - 8  # queue of 4, plus at most a couple of batches taken by the worker
    assert stuck.exported + dropped >= 200 - 4


class _FailingExporter(SpanExporter):
    def __init__(self, raise_: bool) -> None:
        self.raise_ = raise_

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.raise_:
            raise ConnectionError("backend down")
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


@pytest.mark.parametrize("raise_", [False, True], ids=["failure-result", "exception"])
def test_failed_exports_are_counted_as_drops(raise_: bool) -> None:
    name = f"failing-{raise_}"
    recorder = SpanRecorder(build_tracer_provider([(name, _FailingExporter(raise_))], max_queue_size=64))
    before = metric("egress_gateway_span_export_dropped_total", exporter=name, reason="export_failed")
    for port in range(5):
        recorder.open("CONNECT", "127.0.0.2", port).close()
    recorder.force_flush()
    recorder.shutdown()
    assert metric("egress_gateway_span_export_dropped_total", exporter=name, reason="export_failed") == before + 5


def _closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_otlp_endpoint_does_not_slow_recording(
    tmp_path: Path, protocol: Literal["http", "grpc"], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setattr(spans, "OTLP_TIMEOUT_S", 0.5)  # so that shutdown, which waits for the attempt, is quick
    quiet = logging.getLogger("opentelemetry.exporter")  # the exporter's own retry warnings, expected here
    monkeypatch.setattr(quiet, "level", logging.CRITICAL)
    port = _closed_loopback_port()
    endpoint = f"http://127.0.0.1:{port}"
    trail = tmp_path / "audit.jsonl"
    settings = Settings(audit=AuditSettings(file=trail, otlp_endpoint=endpoint, otlp_protocol=protocol))
    recorder = build_recorder(settings)
    started = time.monotonic()
    for client_port in range(300):
        record = recorder.open("CONNECT", "127.0.0.2", client_port)
        record.decided(facts(), allow())
        record.close(bytes_sent=1)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"300 records took {elapsed:.2f}s with an unreachable OTLP endpoint"
    # The trail file is fed by its own processor and completes despite the dead OTLP endpoint.
    deadline = time.monotonic() + 10
    while len(span_lines(trail.read_text())) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(span_lines(trail.read_text())) == 300
    started = time.monotonic()
    recorder.shutdown()
    assert time.monotonic() - started < 10


def test_console_exporter_prints_spans_on_stderr_and_keeps_stdout_empty(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")  # as `egress-gateway run` does: log lines go to stderr too
    try:
        recorder = build_recorder(Settings(audit=AuditSettings(console=True)))
        record = recorder.open("CONNECT", "127.0.0.2", 42000)
        record.decided(facts(), allow())
        record.close()
        recorder.shutdown()
    finally:
        structlog.reset_defaults()
    out, err = capsys.readouterr()
    assert out == ""
    assert '"name": "egress CONNECT"' in err and '"egress.rule": "stripe"' in err


def test_each_connection_has_an_open_record_at_its_first_decision_joined_by_its_ids(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    recorder = build_recorder(Settings(audit=AuditSettings(file=trail, flush_interval_s=0.05)))
    tunnel = recorder.open("CONNECT", "127.0.0.2", 41000)
    tunnel.set(server_address="api.stripe.com", server_port=443)
    tunnel.decided(facts(), allow())
    tunnel.decided(facts(sni="api.stripe.com"), allow())  # the SNI re-decision: no second open record
    deadline = time.monotonic() + 10
    while '"recordType":"open"' not in trail.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    (opened,) = [json.loads(line) for line in trail.read_text().splitlines()]
    assert opened["recordType"] == "open" and opened["name"] == "egress CONNECT"
    assert (opened["traceId"], opened["spanId"]) == (tunnel.trace_id, tunnel.span_id)  # type: ignore[attr-defined]
    attributes = {a["key"]: a["value"] for a in opened["attributes"]}
    assert attributes["egress.decision"] == {"stringValue": "allow"}
    assert attributes["server.address"] == {"stringValue": "api.stripe.com"}
    tunnel.close(bytes_sent=5, bytes_received=7)
    recorder.shutdown()
    (closed,) = [json.loads(line) for line in span_lines(trail.read_text())]
    assert (closed["traceId"], closed["spanId"]) == (opened["traceId"], opened["spanId"])
    assert int(closed["startTimeUnixNano"]) <= int(opened["timeUnixNano"]) <= int(closed["endTimeUnixNano"])
