"""The JSON-lines audit trail (record types, format and chain: docs/audit.md).

`TrailWriter` owns the file and a bounded queue drained by its own thread, so the proxy's event loop only appends;
a full queue drops the new record, counted. Each record is encoded on its own (`audit/otlp_json.py`, orjson): one
that cannot be encoded is dropped, counted and logged, never its batch. Every line is sealed into the hash chain
(`audit/chain.py`) on this thread, across rotation (`audit/rotation.py`) and external rotation (a moved path is
reopened); a writer appending to an existing trail links to its last record. Every `checkpoint_interval_s` and at
shutdown it writes a `checkpoint` record and logs its `seq` and hash (`audit_checkpoint`). Must not import the proxy.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from egress_gateway import metrics
from egress_gateway.audit.chain import GENESIS, Chain, last_hash
from egress_gateway.audit.logs import RateLimitedWarning
from egress_gateway.audit.otlp_json import FinishedRecord, OpenedRecord, open_object, record_object
from egress_gateway.audit.rotation import Rotation

log = structlog.get_logger("egress_gateway.audit")

EXPORTER_NAME = "file"
MAX_BATCH = 512
FLUSH_INTERVAL_S = 1.0
CHECKPOINT_INTERVAL_S = 60.0
_TAIL_BYTES = 1 << 16  # enough for the last complete line of an existing trail


class TrailWriter:
    """Appends finished records to `path`. Opens in the constructor, so a bad path fails at startup, not later."""

    def __init__(
        self,
        path: Path,
        *,
        max_queue_size: int,
        envelope: dict[str, Any],
        mode: int = 0o640,
        hmac_key: bytes | None = None,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        rotation: Rotation | None = None,
    ) -> None:
        self.path = Path(path)
        self._mode = mode
        # {"resource": ..., "scope": ...}, the same on every span line: encoded once.
        self._envelope = {name: orjson.Fragment(orjson.dumps(value)) for name, value in envelope.items()}
        self._max_queue_size = max_queue_size
        self._checkpoint_interval_s = checkpoint_interval_s
        self._flush_interval_s = flush_interval_s
        self._rotation = rotation or Rotation()
        self._opened_at = time.monotonic()
        self._next_checkpoint = time.monotonic() + checkpoint_interval_s
        # A span (the close record), an open record, or a prepared record (a dict with its `recordType`).
        self._pending: collections.deque[FinishedRecord | OpenedRecord | Mapping[str, Any]] = collections.deque()
        self._file: IO[bytes] | None = None
        self._write_lock = threading.Lock()  # one batch at a time, in queue order
        self._wake = threading.Event()
        self._stopping = False
        self._queue_full = RateLimitedWarning("audit_queue_full")
        self._not_encodable = RateLimitedWarning("audit_record_not_encodable")
        self._write_failed = RateLimitedWarning("audit_export_failed")
        self._open()
        self.chain = Chain(key=hmac_key, prev=self._link())
        self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
        self._thread.start()

    def submit(self, record: FinishedRecord | OpenedRecord | Mapping[str, Any]) -> None:
        """Called on the event loop: never blocks, never raises."""
        queue = self._pending
        if len(queue) >= self._max_queue_size or self._stopping:
            metrics.span_export_dropped(EXPORTER_NAME, "queue_full")
            self._queue_full(exporter=EXPORTER_NAME)
            return
        queue.append(record)
        if len(queue) == MAX_BATCH:
            self._wake.set()

    def busy(self) -> bool:
        """A full batch is waiting or being written (what a benchmark's idle loop waits for)."""
        return len(self._pending) >= MAX_BATCH or self._write_lock.locked()

    def force_flush(self) -> None:
        self._drain()

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._drain()
        self._checkpoint(final=True)
        with self._write_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self._rotation.wait()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            self._drain()
            if time.monotonic() >= self._next_checkpoint:
                self._checkpoint(final=False)

    def _checkpoint(self, *, final: bool) -> None:
        """Writes a checkpoint record and, once it is written, logs the chain's head."""
        self._next_checkpoint = time.monotonic() + self._checkpoint_interval_s
        chain = self.chain
        with self._write_lock:
            now = str(time.time_ns())
            if self._write([{"recordType": "checkpoint", "timeUnixNano": now, "records": chain.seq, "final": final}]):
                log.info(
                    "audit_checkpoint", instance=chain.instance, seq=chain.seq - 1, hash=chain.prev, path=str(self.path)
                )

    def _drain(self) -> None:
        queue = self._pending
        with self._write_lock:
            while queue:
                batch = [queue.popleft() for _ in range(min(MAX_BATCH, len(queue)))]
                self._write(batch)

    def _write(self, batch: list[FinishedRecord | OpenedRecord | Mapping[str, Any]]) -> bool:
        """Encodes, seals and appends `batch`; False when nothing was written."""
        lines: list[bytes] = []
        envelope = self._envelope
        seal = self.chain.seal
        spans = 0
        for record in batch:
            try:
                if isinstance(record, FinishedRecord):
                    body = orjson.dumps(record_object(record, envelope))
                    spans += 1
                elif isinstance(record, OpenedRecord):
                    body = orjson.dumps(open_object(record))
                else:
                    body = orjson.dumps(record)
            except Exception as exc:  # this record only: the others of the batch are written
                metrics.span_export_dropped(EXPORTER_NAME, "encode_failed")
                self._not_encodable(error=repr(exc))
                continue
            lines.append(seal(body))
        if not lines:
            return False
        lines.append(b"")
        try:
            if self._file is not None and self._rotated():
                self._file.close()
                self._file = None
            if self._file is not None and self._rotation.due(self._file.tell(), self._opened_at):
                self._file.close()
                self._file = None
                self._rotation.rotate(self.path)
            if self._file is None:
                self._open()
            assert self._file is not None
            self._file.write(b"\n".join(lines))
            self._file.flush()
        except (OSError, ValueError) as exc:
            metrics.span_export_dropped(EXPORTER_NAME, "export_failed", spans)
            self._write_failed(len(lines) - 1, exporter=EXPORTER_NAME, error=repr(exc))
            return False
        metrics.spans_exported(EXPORTER_NAME, spans)
        return True

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self._mode)
        self._file = os.fdopen(fd, "ab")
        self._opened_at = time.monotonic()

    def _link(self) -> str:
        """What the first record links to: the last sealed record of the trail this writer appends to. A line a
        crash cut short is ended first, so the next record starts on its own line (verify reports the cut one)."""
        try:
            with open(self.path, "rb") as existing:
                size = existing.seek(0, os.SEEK_END)
                existing.seek(max(0, size - _TAIL_BYTES))
                tail = existing.read()
        except OSError:
            return GENESIS
        if tail and not tail.endswith(b"\n"):
            assert self._file is not None
            self._file.write(b"\n")
            self._file.flush()
        return last_hash(tail) or GENESIS

    def _rotated(self) -> bool:
        assert self._file is not None
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return True
        current = os.fstat(self._file.fileno())
        return (on_disk.st_dev, on_disk.st_ino) != (current.st_dev, current.st_ino)
