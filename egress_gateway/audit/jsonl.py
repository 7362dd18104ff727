"""The JSON-lines audit trail: a SpanExporter writing one finished span per line, in OTLP/JSON field names.

Each line is one OTLP `Span` object as the OTLP/JSON mapping writes it (`traceId`/`spanId` as hex, `kind` and
`status.code` as integers, 64-bit nanosecond times as strings, `attributes` as a list of `{key, value:
AnyValue}`), plus the `resource` and `scope` it came from. Spans are encoded in one pass by `audit/otlp_json.py`,
which writes what the OpenTelemetry SDK's OTLP encoder plus protobuf's JSON mapping write (a test compares them; that
SDK path, `sdk_spans_to_lines`, is kept as the fallback for values the direct encoder does not know), so the trail
says exactly what an OTLP receiver would get.

Runs on the batch processor's worker thread, never on the proxy's event loop. Follows external rotation: when
the path no longer names the open file (logrotate `create`, `mv`), the next batch reopens it. Must not import
the proxy.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from egress_gateway.audit import otlp_json

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(obj: dict[str, Any]) -> None:
    # protobuf's JSON mapping writes `bytes` as base64; OTLP/JSON requires trace and span ids as hex.
    for key in _ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str):
            obj[key] = base64.b64decode(value).hex()


_MAX_CACHED_TAILS = 16
# (resource, scope) -> the encoded `,"resource":{...},"scope":{...}}` that ends each of their lines.
_tails: dict[tuple[Any, Any], str] = {}
# The last (resource, scope, tail): every span of a gateway has the same two objects, and hashing a `Resource`
# dumps its attributes as JSON each time.
_last_tail: tuple[Any, Any, str] | None = None


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _tail(span: ReadableSpan) -> str:
    global _last_tail
    resource, scope = span.resource, span.instrumentation_scope
    last = _last_tail
    if last is not None and last[0] is resource and last[1] is scope:
        return last[2]
    key = (resource, scope)
    tail = _tails.get(key)
    if tail is None:
        tail = f',"resource":{_dumps(otlp_json.resource(resource))},"scope":{_dumps(otlp_json.scope(scope))}}}'
        if len(_tails) >= _MAX_CACHED_TAILS:
            _tails.clear()
        _tails[key] = tail
    _last_tail = (resource, scope, tail)
    return tail


def span_to_line(span: ReadableSpan) -> str:
    """One span as a JSON line by the direct encoder; raises `otlp_json.UnsupportedValue` where it cannot."""
    return otlp_json.span_json_open(span) + _tail(span)


def spans_to_lines(spans: Sequence[ReadableSpan]) -> list[str]:
    """Encode finished spans as JSON lines (without the trailing newline)."""
    try:
        return [span_to_line(span) for span in spans]
    except otlp_json.UnsupportedValue:
        return sdk_spans_to_lines(spans)


def sdk_spans_to_lines(spans: Sequence[ReadableSpan]) -> list[str]:
    """The same lines by the SDK's protobuf encoder and protobuf's JSON mapping (slower: two encodings per span)."""
    request = encode_spans(spans)
    lines: list[str] = []
    for resource_spans in request.resource_spans:
        resource = MessageToDict(resource_spans.resource, use_integers_for_enums=True)
        for scope_spans in resource_spans.scope_spans:
            scope = MessageToDict(scope_spans.scope, use_integers_for_enums=True)
            for span in scope_spans.spans:
                obj = MessageToDict(span, use_integers_for_enums=True)
                _hex_ids(obj)
                for link in obj.get("links", []):
                    _hex_ids(link)
                obj["resource"] = resource
                obj["scope"] = scope
                lines.append(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))
    return lines


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to `path`. It opens in the constructor, so a bad path fails at startup, not later."""

    def __init__(self, path: Path, *, mode: int = 0o640) -> None:
        self.path = Path(path)
        self._mode = mode
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._closed = False
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._mode)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

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
        lines = spans_to_lines(spans)
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
                self._file.write("\n".join(lines) + "\n")
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
