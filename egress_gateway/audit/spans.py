"""OpenTelemetry spans for the audit trail: tracer provider, exporters, and the `Recorder` the proxy uses.

One span per CONNECT tunnel or plain-HTTP request, from accept to close, named `egress CONNECT` / `egress
GET`; attributes as `audit/fields.py` names them; status ERROR when the final decision denies. Every exporter
sits behind its own batch processor with a bounded queue, so a slow or unreachable OTLP endpoint never blocks
the proxy nor starves the trail file; spans lost to a full queue or a failed export are counted (metric) and
logged, rate-limited. `SpanRecorder` never raises into the data path. Must not import the proxy, the sources
or the engine module.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import structlog
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, format_span_id, format_trace_id

from egress_gateway import __version__
from egress_gateway.audit import fields, metrics
from egress_gateway.audit.logs import log_decision
from egress_gateway.audit.recorder import ConnectionRecord, NullRecord
from egress_gateway.policy.decision import Decision, Facts
from egress_gateway.settings import AuditSettings

log = structlog.get_logger("egress_gateway.audit")

SERVICE_NAME = "egress-gateway"
TRACER_NAME = "egress_gateway.audit"
MAX_EXPORT_BATCH = 512
OTLP_TIMEOUT_S = 5.0
SPAN_LIMITS = SpanLimits(max_span_attributes=256, max_event_attributes=64, max_events=64)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)

P = ParamSpec("P")
R = TypeVar("R")


class _RateLimitedWarning:
    """Logs a warning at most once per `interval` seconds, carrying how many occurrences it summarizes."""

    def __init__(self, event: str, interval: float = 10.0) -> None:
        self._event = event
        self._interval = interval
        self._lock = threading.Lock()
        self._pending = 0
        self._last = 0.0

    def __call__(self, count: int = 1, **fields: Any) -> None:
        with self._lock:
            self._pending += count
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            pending, self._pending, self._last = self._pending, 0, now
        log.warning(self._event, count=pending, **fields)


_record_failure = _RateLimitedWarning("audit_record_failed")


def _never_raise[**P, R](method: Callable[P, R | None]) -> Callable[P, R | None]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # the audit trail must never break a connection
            _record_failure(error=repr(exc), method=method.__name__)
            return None

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class CountingExporter(SpanExporter):
    """Wraps an exporter: counts exported and failed spans, and turns exceptions into FAILURE."""

    def __init__(self, inner: SpanExporter, name: str) -> None:
        self.inner = inner
        self.name = name
        self._warn = _RateLimitedWarning("audit_export_failed")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            metrics.spans_exported(self.name, len(spans))
        else:
            metrics.span_export_dropped(self.name, "export_failed", len(spans))
            self._warn(len(spans), exporter=self.name)
        return result

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self.inner.force_flush(timeout_millis)
        except Exception:
            return False

    def shutdown(self) -> None:
        try:
            self.inner.shutdown()
        except Exception as exc:
            log.warning("audit_exporter_shutdown_failed", exporter=self.name, error=repr(exc))


class BoundedBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor (bounded deque, worker thread) plus a count of spans dropped on a full queue.

    The SDK drops the oldest queued span when the queue is full and only logs it; we count it per exporter.
    """

    def __init__(self, exporter: SpanExporter, name: str, max_queue_size: int) -> None:
        super().__init__(
            CountingExporter(exporter, name),
            max_queue_size=max_queue_size,
            max_export_batch_size=min(MAX_EXPORT_BATCH, max_queue_size),
        )
        self.name = name
        self._warn = _RateLimitedWarning("audit_queue_full")

    def _queue_full(self) -> bool:
        batch = getattr(self, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        if queue is None or queue.maxlen is None:
            return False
        return len(queue) >= queue.maxlen

    def on_end(self, span: ReadableSpan) -> None:
        if self._queue_full():
            metrics.span_export_dropped(self.name, "queue_full")
            self._warn(exporter=self.name)
        super().on_end(span)


def build_resource() -> Resource:
    """`service.*` of this gateway instance, and its own pod/namespace when the Downward API provides them."""
    attributes: dict[str, str] = {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "service.instance.id": os.environ.get("POD_UID") or str(uuid.uuid4()),
    }
    if os.environ.get("POD_NAME"):
        attributes["k8s.pod.name"] = os.environ["POD_NAME"]
    if os.environ.get("POD_NAMESPACE"):
        attributes["k8s.namespace.name"] = os.environ["POD_NAMESPACE"]
    return Resource.create(attributes)


def otlp_http_traces_url(endpoint: str) -> str:
    """`http://collector:4318` -> `http://collector:4318/v1/traces`; a URL with a path is kept as given."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"audit.otlp_endpoint {endpoint!r}: expected a URL like http://collector:4318")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def build_exporters(audit: AuditSettings) -> list[tuple[str, SpanExporter]]:
    """The configured exporters by name ("file", "otlp", "console"). Raises ValueError on bad settings."""
    exporters: list[tuple[str, SpanExporter]] = []
    if audit.file is not None:
        from egress_gateway.audit.jsonl import JsonLinesSpanExporter

        try:
            exporters.append(("file", JsonLinesSpanExporter(audit.file)))
        except OSError as exc:
            raise ValueError(f"audit.file {str(audit.file)!r} cannot be opened for appending: {exc}") from exc
    if audit.otlp_endpoint:
        if audit.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporters.append(
                (
                    "otlp",
                    GrpcExporter(
                        endpoint=audit.otlp_endpoint, headers=dict(audit.otlp_headers), timeout=OTLP_TIMEOUT_S
                    ),
                )
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporters.append(
                (
                    "otlp",
                    HttpExporter(
                        endpoint=otlp_http_traces_url(audit.otlp_endpoint),
                        headers=dict(audit.otlp_headers),
                        timeout=OTLP_TIMEOUT_S,
                    ),
                )
            )
    if audit.console:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout of `egress-gateway run` stays empty (docs/configuration.md).
        exporters.append(("console", ConsoleSpanExporter(service_name=SERVICE_NAME, out=sys.stderr)))
    return exporters


def build_tracer_provider(
    exporters: Sequence[tuple[str, SpanExporter]], *, max_queue_size: int, resource: Resource | None = None
) -> TracerProvider:
    # Always sample: an audit trail that samples is not an audit trail (OTEL_TRACES_SAMPLER is ignored here).
    provider = TracerProvider(
        resource=resource or build_resource(),
        sampler=ALWAYS_ON,
        span_limits=SPAN_LIMITS,
    )
    for name, exporter in exporters:
        provider.add_span_processor(BoundedBatchSpanProcessor(exporter, name, max_queue_size))
    return provider


class SpanRecord:
    """One connection's span. Attributes are gathered and applied at close, so a later decision (SNI after
    CONNECT) replaces the earlier one's policy/rule instead of leaving them mixed; each decision is an event.

    The finished span is built once, at close, as a `ReadableSpan` and handed to the tracer's span processors
    (`on_end`), instead of driving an SDK `Span` through a dozen calls that each re-validate every attribute: every
    value here is already an attribute primitive (`fields.to_attribute_value`), and the SDK's limits (`SPAN_LIMITS`)
    are applied the same way (oldest events dropped and counted; attributes bounded). Processors' `on_start` is not
    called (the batch processors do nothing there). Sampling is always on.

    Decision log lines: one per connection unless a later decision changes the outcome. The line of a tunnel's
    allowing CONNECT decision is held until the next stage: the SNI decision replaces it when the outcome stays the
    same (one line, with the SNI), both are written when it changes; any other stage or the close writes it.
    """

    def __init__(
        self, tracer: Tracer, scope: InstrumentationScope, kind: str, client_address: str, client_port: int
    ) -> None:
        self._tracer = tracer
        self._scope = scope
        self._kind = kind
        self._opened = time.monotonic()
        self._start_ns = time.time_ns()
        self._attributes: dict[str, fields.AttributeValue] = {
            fields.CLIENT_ADDRESS: client_address,
            fields.CLIENT_PORT: client_port,
            fields.HTTP_METHOD: kind,
        }
        self._decision: dict[str, fields.AttributeValue] = {}
        self._denied: str | None = None
        self._namespace: str | None = None
        self._decisions = 0
        self._closed = False
        self._closed_event = False
        self._resolved_event = False
        self._pending_decided: dict[str, fields.AttributeValue] = {}
        self._outcome: tuple[str, str, str | None] | None = None
        self._pending_line: dict[str, fields.AttributeValue] | None = None
        self._events: BoundedList = BoundedList(SPAN_LIMITS.max_events)
        ids = tracer.id_generator
        context = SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False, trace_flags=_SAMPLED)
        self._context = context
        self.trace_id = format_trace_id(context.trace_id)
        self.span_id = format_span_id(context.span_id)
        metrics.connection_opened(kind)

    @_never_raise
    def event(self, name: str, **attributes: Any) -> None:
        if self._closed:
            return
        values = {
            key: value
            for key, value in ((k, fields.to_attribute_value(v)) for k, v in attributes.items())
            if value is not None and not fields.is_secret_key(key)
        }
        if name == "decided":  # `decided()` writes this event; keep what the caller measured (e.g. duration_s)
            self._pending_decided.update(values)
            return
        if name != "client_hello":
            self._write_pending_line()
        if name == "closed":
            self._closed_event = True
        if name == "resolved":
            if self._resolved_event:
                return
            self._resolved_event = True
        self._add_event(name, values)

    @_never_raise
    def set(self, **attributes: Any) -> None:
        if self._closed:
            return
        values = fields.proxy_attributes(attributes)
        peer = values.get(fields.NETWORK_PEER_ADDRESS)
        if peer is not None and not self._resolved_event:
            # The proxy reports the pinned IP as soon as resolution returns: that moment is the `resolved` stage.
            self._resolved_event = True
            self._add_event("resolved", {fields.NETWORK_PEER_ADDRESS: peer})
        self._attributes.update(values)

    @_never_raise
    def decided(self, facts: Facts, decision: Decision) -> None:
        if self._closed:
            return
        self._decisions += 1
        if self._decisions == 1:
            metrics.observe_decision_latency(time.monotonic() - self._opened)
        self._attributes.update(fields.facts_attributes(facts))
        self._decision = fields.decision_attributes(decision)
        self._namespace = facts.identity.namespace if facts.identity else None
        self._denied = None if decision.allowed else decision.message
        event = {key: self._decision[key] for key in (fields.DECISION, fields.REASON) if key in self._decision}
        for key in (fields.POLICY, fields.RULE, fields.WOULD_DENY):
            if key in self._decision:
                event[key] = self._decision[key]
        event.update(self._pending_decided)
        self._pending_decided = {}
        self._add_event("decided", event)
        would_deny_reason = str(decision.audit_reason.value) if decision.would_deny and decision.audit_reason else None
        outcome = (decision.verdict, str(decision.reason.value), would_deny_reason)
        # Count connections, not re-checks: the SNI re-decision of a tunnel counts only if it changes the outcome.
        changed = outcome != self._outcome
        if changed:
            self._outcome = outcome
            metrics.record_decision(self._namespace, outcome[0], outcome[1], would_deny_reason=would_deny_reason)
        if changed:
            self._write_pending_line()
        else:
            self._pending_line = None  # this line says the same with more facts (the SNI): it replaces the held one
        line = {**self._attributes, **self._decision}
        if self._kind == "CONNECT" and self._decisions == 1 and decision.allowed:
            self._pending_line = line
        else:
            self._write_line(line)

    def _add_event(self, name: str, values: dict[str, fields.AttributeValue]) -> None:
        attributes: dict[str, fields.AttributeValue] | BoundedAttributes = values
        if len(values) > (SPAN_LIMITS.max_event_attributes or 0):
            attributes = BoundedAttributes(SPAN_LIMITS.max_event_attributes, values, immutable=True)
        self._events.append(Event(name, attributes, time.time_ns()))

    def _write_line(self, line: dict[str, fields.AttributeValue]) -> None:
        log_decision(line, trace_id=self.trace_id, span_id=self.span_id, name=f"egress {self._kind}")

    def _write_pending_line(self) -> None:
        if self._pending_line is not None:
            line, self._pending_line = self._pending_line, None
            self._write_line(line)

    @_never_raise
    def close(self, *, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._write_pending_line()
            if not self._closed_event:
                self._add_event("closed", {fields.BYTES_SENT: bytes_sent, fields.BYTES_RECEIVED: bytes_received})
            attributes: dict[str, fields.AttributeValue] | BoundedAttributes = {
                **self._attributes,
                **self._decision,
                fields.BYTES_SENT: bytes_sent,
                fields.BYTES_RECEIVED: bytes_received,
            }
            if len(attributes) > (SPAN_LIMITS.max_span_attributes or 0):
                attributes = BoundedAttributes(SPAN_LIMITS.max_span_attributes, attributes, immutable=True)
            status = _UNSET if self._denied is None else Status(StatusCode.ERROR, self._denied)
            span = ReadableSpan(
                name=f"egress {self._kind}",
                context=self._context,
                parent=None,
                resource=self._tracer.resource,
                attributes=attributes,
                events=self._events,
                kind=SpanKind.SERVER,
                status=status,
                start_time=self._start_ns,
                end_time=time.time_ns(),
                instrumentation_scope=self._scope,
            )
            self._tracer.span_processor.on_end(span)
        finally:
            metrics.connection_closed(self._kind, self._namespace, bytes_sent, bytes_received)


class SpanRecorder:
    """The `Recorder` of the gateway: spans + decision log lines + metrics."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        tracer = provider.get_tracer(TRACER_NAME, __version__)
        if not isinstance(tracer, Tracer):  # e.g. OTEL_SDK_DISABLED: the audit trail cannot be turned off that way
            raise ValueError("the audit trail needs the OpenTelemetry SDK's tracer; is OTEL_SDK_DISABLED set?")
        self._tracer = tracer
        self._scope = InstrumentationScope(TRACER_NAME, __version__)
        self._shut = False

    def open(self, kind: str, client_address: str, client_port: int) -> ConnectionRecord:
        try:
            return SpanRecord(self._tracer, self._scope, kind, client_address, client_port)
        except Exception as exc:
            _record_failure(error=repr(exc), method="open")
            return NullRecord()

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        try:
            self.provider.shutdown()
        except Exception as exc:
            log.warning("audit_shutdown_failed", error=repr(exc))
