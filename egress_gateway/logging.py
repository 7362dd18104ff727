"""Process-wide logging setup: structlog lines on stderr, nothing else on stdout.

structlog is configured here and only here (`configure_logging`, with `audit.logs.redact_secrets` on every line);
`setup_logging`, for `egress-gateway run`, also routes the standard-library loggers (mitmproxy, asyncio, the
kubernetes client) through it, quietened to warnings so that the proxy core's per-connection chatter costs nothing
on the data path, and writes the JSON lines logged on the event loop with at most two writes per loop iteration
(`LineBatcher`). Imports structlog and the audit log's redaction step only.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import threading
from typing import Any, BinaryIO, Literal

import orjson
import structlog

from egress_gateway.audit.logs import redact_secrets

# Libraries that log per connection at INFO; their warnings and errors still come through.
_QUIET = ("mitmproxy", "asyncio", "kubernetes", "urllib3", "watchfiles", "hpack", "aiohttp.access")


# What `structlog.BytesLoggerFactory(sys.stderr.buffer)` / `PrintLoggerFactory(sys.stderr)` give, with the stream
# looked up when a logger is made rather than once at configuration: whoever replaces sys.stderr later (a command run
# in-process, a test's capture) is followed, and a logger never writes to a stream closed since.
def _stderr_bytes_logger(*_args: Any) -> structlog.BytesLogger:
    return structlog.BytesLogger(sys.stderr.buffer)


def _stderr_print_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


class LineBatcher:
    """A structlog logger for rendered JSON lines, like `structlog.BytesLogger` but with fewer writes under load: the
    first line logged in an event-loop iteration is written at once (a lone line is as prompt as before), the lines
    after it in the same iteration are gathered and written together, with one write, at the end of the iteration
    (`call_soon`) or as soon as they reach `MAX_BATCH_BYTES`; a line logged off the loop is written at once, after
    what was gathered. `flush` writes what is gathered (`setup_logging` registers it to run at exit, after the SIGTERM
    drain). A SIGKILL loses at most the gathered lines of the current loop iteration; the audit trail file, not the
    log, is the durable record."""

    MAX_BATCH_BYTES = 64 * 1024

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()  # loop threads and other threads log alike
        self._lines: list[bytes] = []
        self._size = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop whose current iteration has written a line

    def msg(self, message: bytes) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if loop is None and not self._lines:  # off the loop with nothing gathered: as BytesLogger writes
                self.stream.write(message + b"\n")
                self.stream.flush()
                return
            self._lines.append(message)
            if loop is not None and loop is self._loop:  # not the iteration's first line: gathered
                self._size += len(message)
                if self._size < self.MAX_BATCH_BYTES:
                    return
            elif loop is not None:  # the iteration's first line: at once, and the flush at the iteration's end
                self._loop = loop
                loop.call_soon(self.flush)
            self._write()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg

    def flush(self) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):  # a stream closed at exit: nothing to save
            self._loop = None
            self._write()

    def _write(self) -> None:
        if self._lines:
            lines, self._lines, self._size = self._lines, [], 0
            lines.append(b"")
            data = memoryview(b"\n".join(lines))
            while data and (written := self.stream.write(data)):  # stderr is unbuffered: a signal may cut a write
                data = data[written:]
            self.stream.flush()


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["json", "console"] = "json",
    *,
    cache_loggers: bool = False,
    lines: LineBatcher | None = None,
) -> None:
    """Configure structlog for the process. `egress-gateway run` configures once and caches loggers on first use
    (`cache_loggers=True`); a cached logger keeps the configuration and the stream of its first use, so commands and
    tests that configure more than once leave it off. JSON lines go to `lines` when given, else to stderr at once."""
    renderer: Any
    factory: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = _stderr_bytes_logger if lines is None else lambda *_args: lines
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        factory = _stderr_print_logger
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=cache_loggers,
    )
    # The SDK's batch processor logs every dropped span; we count drops and log them rate-limited instead.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


class StructlogHandler(logging.Handler):
    """Forwards standard-library log records to structlog, keeping the logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            fields = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info  # type: ignore[assignment]
            logger.log(record.levelno, record.getMessage(), **fields)
        except Exception:  # a log line must never break the data path
            self.handleError(record)


def setup_logging(
    level: Literal["debug", "info", "warning", "error"] = "info", fmt: Literal["json", "console"] = "json"
) -> None:
    lines = LineBatcher(sys.stderr.buffer) if fmt == "json" else None
    if lines is not None:
        atexit.register(lines.flush)
    configure_logging(level, fmt, cache_loggers=True, lines=lines)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(StructlogHandler())
    root.setLevel(getattr(logging, level.upper()))
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
