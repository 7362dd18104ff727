"""The `Recorder` the proxy uses (`SpanRecorder`, one `SpanRecord` per connection) and its OpenTelemetry side.

A record goes to the trail writer and, when exporters are configured, to the SDK as one span; each exporter sits
behind its own bounded batch processor, so a slow OTLP endpoint never blocks the proxy nor starves the trail file
(docs/audit.md). Nothing here raises into the data path. Must not import the proxy, the sources or the engine.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import structlog
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_span_id, format_trace_id

from egress_gateway import __version__, metrics
from egress_gateway.audit import fields, otlp_json
from egress_gateway.audit.jsonl import TrailWriter
from egress_gateway.audit.logs import RateLimitedWarning, decision_logger, log_decision
from egress_gateway.audit.otlp_json import FinishedRecord, OpenedRecord
from egress_gateway.audit.recorder import ConnectionRecord, NullRecord
from egress_gateway.audit.retry import ExportTracker
from egress_gateway.audit.rotation import Rotation
from egress_gateway.audit.snapshot import decision_config, policy_annotations, policy_record
from egress_gateway.policy.decision import Decision, Facts, Identity, Reason
from egress_gateway.policy.engine import PolicySet
from egress_gateway.settings import AuditSettings, Settings

log = structlog.get_logger("egress_gateway.audit")

SERVICE_NAME = "egress-gateway"
TRACER_NAME = "egress_gateway.audit"
MAX_EXPORT_BATCH = 512
OTLP_TIMEOUT_S = 5.0
SPAN_LIMITS = SpanLimits(max_span_attributes=256, max_event_attributes=64, max_events=64)


_record_failure = RateLimitedWarning("audit_record_failed")


class BoundedBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops on a full queue (the SDK only logs them): its queue
    length is not public, so it is kept from what went in (`on_end`) and what the exporter took."""

    def __init__(self, exporter: ExportTracker, max_queue_size: int) -> None:
        super().__init__(
            exporter, max_queue_size=max_queue_size, max_export_batch_size=min(MAX_EXPORT_BATCH, max_queue_size)
        )
        self._exporter = exporter
        self._max_queue_size = max_queue_size
        self._submitted = 0  # written by the event loop only
        self._dropped = 0
        self._warn = RateLimitedWarning("audit_queue_full")

    def on_end(self, span: ReadableSpan) -> None:
        if self._submitted - self._exporter.taken - self._dropped >= self._max_queue_size:
            self._dropped += 1
            metrics.span_export_dropped(self._exporter.name, "queue_full")
            self._warn(exporter=self._exporter.name)
        self._submitted += 1
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
    """The configured OpenTelemetry exporters by name ("otlp", "console"). Raises ValueError on bad settings."""
    exporters: list[tuple[str, SpanExporter]] = []
    if audit.otlp_endpoint:
        endpoint = audit.otlp_endpoint
        exporter: type[SpanExporter]
        if audit.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as exporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as exporter

            endpoint = otlp_http_traces_url(endpoint)
        options = {"endpoint": endpoint, "headers": dict(audit.otlp_headers), "timeout": OTLP_TIMEOUT_S}
        exporters.append(("otlp", exporter(**options)))
    if audit.console:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: stdout of `egress-gateway run` stays empty (docs/configuration.md).
        exporters.append(("console", ConsoleSpanExporter(service_name=SERVICE_NAME, out=sys.stderr)))
    return exporters


def build_tracer_provider(
    exporters: Sequence[tuple[str, SpanExporter]],
    *,
    max_queue_size: int,
    resource: Resource | None = None,
    otlp_retry_buffer: int = 0,
) -> TracerProvider:
    # Always sample: an audit trail that samples is not an audit trail (OTEL_TRACES_SAMPLER is ignored here).
    provider = TracerProvider(
        resource=resource or build_resource(),
        sampler=ALWAYS_ON,
        span_limits=SPAN_LIMITS,
    )
    for name, exporter in exporters:
        tracker = ExportTracker(exporter, name, max_buffered=otlp_retry_buffer if name == "otlp" else 0)
        provider.add_span_processor(BoundedBatchSpanProcessor(tracker, max_queue_size))
    return provider


_MAX_EVENTS = SPAN_LIMITS.max_events or 0
_MAX_EVENT_ATTRIBUTES = SPAN_LIMITS.max_event_attributes or 0
_MAX_SPAN_ATTRIBUTES = SPAN_LIMITS.max_span_attributes or 0
_DECIDED_EVENT_KEYS = (fields.DECISION, fields.REASON, fields.POLICY, fields.RULE, fields.WOULD_DENY)
_NO_PARENT = Context()
_RANDOM_IDS = RandomIdGenerator()  # the ids of a record without OpenTelemetry exporters (the SDK's own generator)


def _bounded(values: dict[str, Any], limit: int) -> tuple[dict[str, Any], int]:
    """The SDK's attribute limit: the newest `limit` keys are kept, the number dropped is counted."""
    if len(values) <= limit:
        return values, 0
    return dict(list(values.items())[-limit:]), len(values) - limit


class SpanRecord:
    """One connection's record: what the proxy set and the facts decided on (`_attributes`), the latest decision's
    attributes (`_decision`, replaced whole, so an SNI decision's policy/rule never mixes with the CONNECT one's),
    the stages as events, the ids. The first decision goes to the trail at once (`OpenedRecord`); the close hands one
    `FinishedRecord` to the trail and the span, within the SDK's limits (`SPAN_LIMITS`).

    Decision log lines: the line of a tunnel's allowing CONNECT decision is held until the next stage; an SNI
    decision with the same outcome replaces it (one line, with the SNI), one that changes it writes both.
    """

    __slots__ = (
        "_attributes",
        "_closed",
        "_decided_by",
        "_decision",
        "_dropped_events",
        "_events",
        "_identity",
        "_ids",
        "_kind",
        "_name",
        "_opened",
        "_outcome",
        "_pending_decided",
        "_pending_line",
        "_recorder",
        "_span",
        "_stages",
        "_start_ns",
    )

    def __init__(self, recorder: SpanRecorder, kind: str, client_address: str, client_port: int) -> None:
        self._recorder = recorder
        self._kind = kind
        self._name = f"egress {kind}"
        self._opened = time.monotonic()
        self._start_ns = time.time_ns()
        self._attributes: dict[str, fields.AttributeValue] = {
            fields.CLIENT_ADDRESS: fields.safe_text(client_address),
            fields.CLIENT_PORT: client_port,
            fields.HTTP_METHOD: fields.safe_text(kind),
        }
        self._decision: dict[str, fields.AttributeValue] = {}
        self._decided_by: Decision | None = None
        self._identity: Identity | None = None
        self._outcome: tuple[fields.AttributeValue | None, ...] | None = None  # verdict, reason, would-deny reason
        self._closed = False
        self._pending_decided: dict[str, fields.AttributeValue] = {}
        self._pending_line: dict[str, fields.AttributeValue] | None = None
        self._events: list[tuple[str, dict[str, Any], int, int]] = []
        self._stages: set[str] = set()  # the names of the events added, dropped or not
        self._dropped_events = 0
        # With exporters, the SDK's span is started now (its ids are the record's: log lines and the open record
        # carry them) and given the record's attributes and events at close.
        self._span = (
            None
            if recorder.tracer is None
            else recorder.tracer.start_span(
                self._name, context=_NO_PARENT, kind=SpanKind.SERVER, start_time=self._start_ns
            )
        )
        if self._span is None:
            self._ids = (_RANDOM_IDS.generate_trace_id(), _RANDOM_IDS.generate_span_id())
        else:
            context = self._span.get_span_context()
            self._ids = (context.trace_id, context.span_id)
        metrics.connection_opened(kind)

    @property
    def trace_id(self) -> str:
        return format_trace_id(self._ids[0])

    @property
    def span_id(self) -> str:
        return format_span_id(self._ids[1])

    def event(self, name: str, **attributes: Any) -> None:
        try:
            if self._closed or (name == "resolved" and "resolved" in self._stages):
                return
            values: dict[str, fields.AttributeValue] = {}
            for key, value in attributes.items():
                coerced = fields.to_attribute_value(value)
                if coerced is not None and not fields.is_secret_key(key):
                    values[key] = coerced
            if name == "decided":  # `decided()` writes this event; keep what the caller measured (e.g. duration_s)
                self._pending_decided.update(values)
                return
            if name != "client_hello":
                self._write_pending_line()
            self._add_event(name, values)
        except Exception as exc:  # the audit trail must never break a connection
            _record_failure(error=repr(exc), method="event")

    def set(self, **attributes: Any) -> None:
        try:
            if self._closed:
                return
            values = fields.proxy_attributes(attributes)
            peer = values.get(fields.NETWORK_PEER_ADDRESS)
            if peer is not None and "resolved" not in self._stages:
                # The proxy reports the pinned IP as soon as resolution returns: that moment is the `resolved` stage.
                self._add_event("resolved", {fields.NETWORK_PEER_ADDRESS: peer})
            self._attributes.update(values)
        except Exception as exc:
            _record_failure(error=repr(exc), method="set")

    def decided(self, facts: Facts, decision: Decision) -> None:
        try:
            if not self._closed:
                self._decided(facts, decision)
        except Exception as exc:
            _record_failure(error=repr(exc), method="decided")

    def _decided(self, facts: Facts, decision: Decision) -> None:
        first = self._outcome is None
        if first:
            metrics.observe_decision_latency(time.monotonic() - self._opened)
        if facts.identity is not self._identity:  # a tunnel's SNI decision has the same identity as its CONNECT
            self._identity = facts.identity
            self._attributes.update(fields.identity_attributes(facts.identity))
        fields.add_facts_attributes(self._attributes, facts)
        if decision is not self._decided_by:  # the SNI check mostly confirms the CONNECT decision (same object)
            self._decided_by = decision
            self._decision = fields.decision_attributes(decision)
            self._recorder.in_force(decision, self._decision)
        attributes = self._decision
        event = {key: attributes[key] for key in _DECIDED_EVENT_KEYS if key in attributes}
        event.update(self._pending_decided)
        self._pending_decided = {}
        self._add_event("decided", event)
        outcome = (attributes[fields.DECISION], attributes[fields.REASON], attributes.get(fields.WOULD_DENY_REASON))
        # Count connections, not re-checks: the SNI re-decision of a tunnel counts only if it changes the outcome.
        if outcome != self._outcome:
            self._outcome = outcome
            namespace = facts.identity.namespace if facts.identity else None
            would_deny = None if outcome[2] is None else str(outcome[2])
            metrics.record_decision(namespace, str(outcome[0]), str(outcome[1]), would_deny_reason=would_deny)
            self._write_pending_line()
        else:
            self._pending_line = None  # this line says the same with more facts (the SNI): it replaces the held one
        line = {**self._attributes, **attributes}
        if first and (trail := self._recorder.trail) is not None:
            trail.submit(OpenedRecord(*self._ids, self._name, time.time_ns(), line))
        if first and self._kind == "CONNECT" and decision.allowed:
            self._pending_line = line
        else:
            self._write_line(line)

    def _add_event(self, name: str, values: dict[str, Any]) -> None:
        values, dropped = _bounded(values, _MAX_EVENT_ATTRIBUTES)
        events = self._events
        if len(events) >= _MAX_EVENTS:  # the SDK's rule: the oldest goes, and is counted
            del events[0]
            self._dropped_events += 1
        events.append((name, values, time.time_ns(), dropped))
        self._stages.add(name)

    def _write_line(self, line: dict[str, fields.AttributeValue]) -> None:
        log_decision(self._recorder.log, line, trace_id=self.trace_id, span_id=self.span_id, name=self._name)

    def _write_pending_line(self) -> None:
        if self._pending_line is not None:
            line, self._pending_line = self._pending_line, None
            self._write_line(line)

    def close(self, *, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        try:
            if self._closed:
                return
            self._closed = True
            try:
                self._end(bytes_sent, bytes_received)
            finally:
                namespace = self._identity.namespace if self._identity else None
                metrics.connection_closed(self._kind, namespace, bytes_sent, bytes_received)
        except Exception as exc:
            _record_failure(error=repr(exc), method="close")

    def _end(self, bytes_sent: int, bytes_received: int) -> None:
        self._write_pending_line()
        sent_received = {fields.BYTES_SENT: bytes_sent, fields.BYTES_RECEIVED: bytes_received}
        if "closed" not in self._stages:
            self._add_event("closed", sent_received)
        attributes, dropped = _bounded({**self._attributes, **self._decision, **sent_received}, _MAX_SPAN_ATTRIBUTES)
        decision = self._decision
        error = str(decision[fields.MESSAGE]) if decision.get(fields.DECISION) == "deny" else None
        end_ns, events, dropped_events = time.time_ns(), self._events, self._dropped_events
        record = FinishedRecord(
            *self._ids, self._name, self._start_ns, end_ns, attributes, dropped, events, dropped_events, error
        )
        self._recorder.finished(self._span, record)


class SpanRecorder:
    """The gateway's `Recorder`: records to the trail file (`trail`) and, through `provider` (from
    `build_tracer_provider`), to OpenTelemetry; either may be absent. Also writes the `policy` records."""

    def __init__(self, provider: TracerProvider | None = None, trail: TrailWriter | None = None) -> None:
        self.provider = provider
        self.trail = trail
        self.tracer: Tracer | None = None
        if provider is not None:
            tracer = provider.get_tracer(TRACER_NAME, __version__)
            if not isinstance(tracer, Tracer):  # e.g. OTEL_SDK_DISABLED: the audit trail cannot be turned off that way
                raise ValueError("the audit trail needs the OpenTelemetry SDK's tracer; is OTEL_SDK_DISABLED set?")
            self.tracer = tracer
        self.log = decision_logger()
        self._shut = False
        self.config: dict[str, Any] = {}  # decision_config(settings), for the `policy` records
        self.annotation_keys: tuple[str, ...] = ()
        self._snapshot: str | None = None
        self._in_force: tuple[Any, ...] = (None,)  # the compiled policies of the last snapshot (never equal at first)
        self._change: dict[str, fields.AttributeValue] = {}
        self._annotations: dict[str, dict[str, str]] = {}  # str(PolicyRef) -> {egress.policy.annotation.<k>: v}

    def policies_in_force(self, policies: PolicySet) -> None:
        """A `policy` record to the trail and a `policies_in_force` log line when what is in force changed (the
        store also publishes unchanged sets, e.g. while a list is loading); later decisions link to it."""
        current = policies.policies
        if len(current) == len(self._in_force) and all(a is b for a, b in zip(current, self._in_force, strict=True)):
            return  # the same compiled policies: the same snapshot
        self._in_force = current
        try:
            record = policy_record(policies, self.config, self.annotation_keys)
        except Exception as exc:
            _record_failure(error=repr(exc), method="policies_in_force")
            return
        if record["snapshot"] == self._snapshot:
            return
        self._snapshot = record["snapshot"]
        self._annotations = {
            str(policy.ref): {fields.POLICY_ANNOTATION_PREFIX + k: fields.safe_text(v) for k, v in found.items()}
            for policy in current
            if (found := policy_annotations(policy, self.annotation_keys))
        }
        if self.trail is not None:
            self.trail.submit(record)
        log.info(
            "policies_in_force",
            snapshot=record["snapshot"],
            generation=record["generation"],
            config_hash=record["config"]["hash"],
            policies=[f"{e['kind']}/{e['namespace'] or ''}/{e['name']}@{e['version']}" for e in record["policies"]],
        )

    def change_in_effect(self, change: str | None, policies: tuple[str, ...] = ()) -> None:
        if change is None:
            self._change = {}
        else:
            self._change = {fields.CHANGE: fields.safe_text(change), fields.CHANGE_POLICIES: "; ".join(policies)}

    def in_force(self, decision: Decision, attributes: dict[str, fields.AttributeValue]) -> None:
        """Adds the snapshot the decision was made under, the deciding policy's recorded annotations, and for a
        revocation the change that caused it."""
        if self._snapshot is not None:
            attributes[fields.POLICY_SNAPSHOT] = self._snapshot
        if self._change and decision.reason in (Reason.REVOKED, Reason.EXPIRED):
            attributes.update(self._change)
        if self._annotations and decision.policy is not None:
            attributes.update(self._annotations.get(str(decision.policy), {}))

    def open(self, kind: str, client_address: str, client_port: int) -> ConnectionRecord:
        try:
            return SpanRecord(self, kind, client_address, client_port)
        except Exception as exc:
            _record_failure(error=repr(exc), method="open")
            return NullRecord()

    def finished(self, span: Span | None, record: FinishedRecord) -> None:
        """A closed record: to the trail, and to OpenTelemetry as its span, with the same values."""
        if self.trail is not None:
            self.trail.submit(record)
        if span is None:
            return
        span.set_attributes(record.attributes)
        for name, values, time_ns, _dropped in record.events:
            span.add_event(name, values, timestamp=time_ns)
        if record.error is not None:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end(end_time=record.end_ns)

    def force_flush(self, timeout_millis: int = 10_000) -> bool:
        if self.trail is not None:
            self.trail.force_flush()
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        try:
            if self.trail is not None:
                self.trail.shutdown()
            if self.provider is not None:
                self.provider.shutdown()
        except Exception as exc:
            log.warning("audit_shutdown_failed", error=repr(exc))


def build_recorder(settings: Settings) -> SpanRecorder:
    """The recorder for `audit:`: the trail file (a path that cannot be opened fails here, at startup, with a clear
    error) and the OpenTelemetry exporters."""
    audit = settings.audit
    resource = build_resource()
    trail = None
    if audit.file is not None:
        envelope = {"resource": otlp_json.resource(resource), "scope": otlp_json.scope(TRACER_NAME, __version__)}
        key = None
        if audit.hmac_key_file is not None:
            try:
                key = audit.hmac_key_file.read_bytes().strip()
            except OSError as exc:
                raise ValueError(f"audit.hmac_key_file {str(audit.hmac_key_file)!r} cannot be read: {exc}") from exc
            if not key:
                raise ValueError(f"audit.hmac_key_file {str(audit.hmac_key_file)!r} is empty")
        rotation = Rotation(audit.rotate_bytes, audit.rotate_interval_s, audit.keep_files, audit.compress_rotated)
        try:
            trail = TrailWriter(
                audit.file,
                max_queue_size=audit.max_queue_size,
                envelope=envelope,
                hmac_key=key,
                checkpoint_interval_s=audit.checkpoint_interval_s,
                flush_interval_s=audit.flush_interval_s,
                rotation=rotation,
            )
        except OSError as exc:
            raise ValueError(f"audit.file {str(audit.file)!r} cannot be opened for appending: {exc}") from exc
    provider = None
    if exporters := build_exporters(audit):
        provider = build_tracer_provider(
            exporters, max_queue_size=audit.max_queue_size, resource=resource, otlp_retry_buffer=audit.otlp_retry_buffer
        )
    recorder = SpanRecorder(provider, trail)
    recorder.config = decision_config(settings)
    recorder.annotation_keys = tuple(audit.policy_annotations)
    return recorder
