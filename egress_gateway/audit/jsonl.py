"""The JSON-lines audit trail: a SpanExporter writing one finished span per line, in OTLP/JSON field names.

Each line is one OTLP `Span` object as the OTLP/JSON mapping writes it (`traceId`/`spanId` as hex, `kind` and
`status.code` as integers, 64-bit nanosecond times as strings, `attributes` as a list of `{key, value:
AnyValue}`), plus the `resource` and `scope` it came from (`audit/otlp_json.py` builds the object, orjson writes
it), so the trail says exactly what an OTLP receiver gets.

Each span is encoded on its own: one that cannot be encoded is dropped, counted and logged, and never takes the
rest of its batch with it. Lines are written as bytes (UTF-8, by orjson), so no value can fail at write time.
Runs on the batch processor's worker thread, never on the proxy's event loop. Follows external rotation: when the
path no longer names the open file (logrotate `create`, `mv`), the next batch reopens it. Must not import the proxy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from egress_gateway import metrics
from egress_gateway.audit import otlp_json
from egress_gateway.audit.logs import RateLimitedWarning

EXPORTER_NAME = "file"
_not_encodable = RateLimitedWarning("audit_span_not_encodable")


def span_to_line(span: ReadableSpan) -> bytes:
    """One finished span as a trail line (without the newline). Raises on a span that cannot be encoded."""
    obj: dict[str, Any] = otlp_json.span(span)
    obj["resource"] = otlp_json.resource(span.resource)
    obj["scope"] = otlp_json.scope(span.instrumentation_scope)
    return orjson.dumps(obj)


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to `path`. It opens in the constructor, so a bad path fails at startup, not later."""

    def __init__(self, path: Path, *, mode: int = 0o640) -> None:
        self.path = Path(path)
        self._mode = mode
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._mode)
        self._file = os.fdopen(fd, "ab")

    def _rotated(self) -> bool:
        assert self._file is not None
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        current = os.fstat(self._file.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (current.st_dev, current.st_ino)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        lines: list[bytes] = []
        for span in spans:
            try:
                lines.append(span_to_line(span))
            except Exception as exc:  # this span only: the others of the batch are written
                metrics.span_export_dropped(EXPORTER_NAME, "encode_failed")
                _not_encodable(span_name=span.name, error=repr(exc))
        if not lines:
            return SpanExportResult.SUCCESS
        lines.append(b"")
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            try:
                if self._file is not None and self._rotated():
                    self._file.close()
                    self._file = None
                if self._file is None:
                    self._open()
                assert self._file is not None
                self._file.write(b"\n".join(lines))
                self._file.flush()
            except (OSError, ValueError):
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if self._file is not None:
                self._file.flush()
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
