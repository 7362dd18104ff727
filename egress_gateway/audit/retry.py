"""`ExportTracker`, the wrapper every OpenTelemetry exporter sits in: counts what it delivers, drops and was given
(`taken`, from which the batch processor counts queue drops); for OTLP (`max_buffered` > 0) a failed batch goes
into a bounded buffer its own thread retries, oldest first, with backoff, and later batches queue behind it, so the
batch worker never waits on a dead receiver (behaviour and metrics: docs/audit.md, "Exporters"). Public SDK API only.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from egress_gateway import metrics
from egress_gateway.audit.logs import RateLimitedWarning

log = structlog.get_logger("egress_gateway.audit")

INITIAL_BACKOFF_S = 0.5
RETRY_BATCH = 512


class ExportTracker(SpanExporter):
    def __init__(
        self,
        inner: SpanExporter,
        name: str,
        *,
        max_buffered: int = 0,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.inner = inner
        self.name = name
        self.taken = 0  # spans handed to export so far (written by the batch worker only)
        self._max_buffered = max_buffered
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._buffer: collections.deque[ReadableSpan] = collections.deque()
        self._lock = threading.Lock()
        self._pending = threading.Event()  # the buffer has spans
        self._stopping = threading.Event()
        self._warn_failed = RateLimitedWarning("audit_export_failed")
        self._warn_retrying = RateLimitedWarning("audit_export_retrying")
        self._warn_dropped = RateLimitedWarning("audit_export_buffer_full")
        self._thread: threading.Thread | None = None
        if max_buffered > 0:
            self._thread = threading.Thread(target=self._run, name=f"audit-retry-{name}", daemon=True)
            self._thread.start()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """On the batch worker: never waits on a backend that is known to be down."""
        self.taken += len(spans)
        if self._thread is None:
            if self._deliver(spans):
                return SpanExportResult.SUCCESS
            metrics.span_export_dropped(self.name, "export_failed", len(spans))
            self._warn_failed(len(spans), exporter=self.name)
            return SpanExportResult.FAILURE
        with self._lock:
            outage = bool(self._buffer)
            if outage:
                self._keep(spans)
        if not outage and not self._deliver(spans):
            with self._lock:
                self._keep(spans)
            self._pending.set()
        return SpanExportResult.SUCCESS  # taken: delivered, or buffered and retried

    def _keep(self, spans: Sequence[ReadableSpan]) -> None:
        buffer = self._buffer
        buffer.extend(spans)
        overflow = len(buffer) - self._max_buffered
        if overflow > 0:
            for _ in range(overflow):
                buffer.popleft()
            metrics.span_export_dropped(self.name, "buffer_full", overflow)
            self._warn_dropped(overflow, exporter=self.name)

    def _deliver(self, spans: Sequence[ReadableSpan]) -> bool:
        try:
            ok = self.inner.export(spans) is SpanExportResult.SUCCESS
        except Exception:
            ok = False
        if ok:
            metrics.spans_exported(self.name, len(spans))
        return ok

    def _run(self) -> None:
        backoff = self._initial_backoff_s
        while not self._stopping.is_set():
            self._pending.wait()
            if self._stopping.is_set():
                return
            # The batch that just failed on the worker counts as the first attempt: wait before retrying it.
            if self._stopping.wait(backoff):
                return
            if self._retry_once():
                backoff = self._initial_backoff_s
            else:
                metrics.span_export_retried(self.name)
                self._warn_retrying(exporter=self.name, buffered=len(self._buffer), next_retry_s=backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    def _retry_once(self) -> bool:
        """Sends the buffer, oldest first, batch by batch; False at the first batch that fails."""
        while True:
            with self._lock:
                batch = [self._buffer[i] for i in range(min(RETRY_BATCH, len(self._buffer)))]
                if not batch:
                    self._pending.clear()
                    return True
            if not self._deliver(batch):
                return False
            with self._lock:  # a full buffer may have dropped some of them meanwhile: pop only what was sent
                for span in batch:
                    if self._buffer and self._buffer[0] is span:
                        self._buffer.popleft()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._buffer:
            self._retry_once()
        try:
            return self.inner.force_flush(timeout_millis) and not self._buffer
        except Exception:
            return False

    def shutdown(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._pending.set()
            self._thread.join(timeout=5)
        if self._buffer and not self._retry_once():
            metrics.span_export_dropped(self.name, "export_failed", len(self._buffer))
            self._buffer.clear()
        try:
            self.inner.shutdown()
        except Exception as exc:
            log.warning("audit_exporter_shutdown_failed", exporter=self.name, error=repr(exc))
