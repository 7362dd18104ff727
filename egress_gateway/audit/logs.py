"""structlog setup (the one place logging is configured) and the per-decision log line.

`configure_logging(level, fmt)` renders JSON (production: structlog's `JSONRenderer` with orjson, bytes written by
a `BytesLogger` on stderr, structlog's documented fast path) or console lines (local) to stderr, with an ISO UTC
timestamp, and a step that drops credential-looking keys and `Basic`/`Bearer` values from every line and escapes
text that is not valid Unicode (from the wire), so no value can make a line fail.
`log_decision` writes one `egress_decision` line through structlog with the span's attributes plus
`trace_id`/`span_id`. Must not import the proxy or the engine.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import orjson
import structlog

from egress_gateway.audit.fields import AttributeValue, is_secret_key, safe_text

REDACTED = "[redacted]"
_CREDENTIAL_PREFIXES = ("basic ", "bearer ", "negotiate ", "digest ")
_CREDENTIAL_FIRST = frozenset("bBnNdD")  # a cheap first test: most values cannot start like a credential

DECISION_EVENT = "egress_decision"
DECISION_LOGGER = "egress_gateway.audit"


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: never let a credential reach a log line, whoever logged it; and write text that is not
    valid Unicode (a byte from the wire that was not UTF-8, kept as a lone surrogate) escaped, and an integer JSON
    cannot hold exactly as text, instead of failing the line."""
    for key, value in event_dict.items():  # replacing values (not keys) while iterating is safe
        if key != "event" and is_secret_key(key):
            event_dict[key] = REDACTED
            continue
        kind = type(value)
        if kind is str:
            if value[:1] in _CREDENTIAL_FIRST and value[:10].lower().startswith(_CREDENTIAL_PREFIXES):
                event_dict[key] = REDACTED
            elif not value.isascii():
                event_dict[key] = safe_text(value)
        elif kind is int and not _INT64_MIN <= value <= _UINT64_MAX:
            event_dict[key] = str(value)
        elif isinstance(value, str) and value[:10].lower().startswith(_CREDENTIAL_PREFIXES):
            event_dict[key] = REDACTED
    return event_dict


_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


# What `structlog.BytesLoggerFactory(sys.stderr.buffer)` / `PrintLoggerFactory(sys.stderr)` give, with the stream
# looked up when a logger is made rather than once at configuration: whoever replaces sys.stderr later (a command run
# in-process, a test's capture) is followed, and a logger never writes to a stream closed since.
def _stderr_bytes_logger(*_args: Any) -> structlog.BytesLogger:
    return structlog.BytesLogger(sys.stderr.buffer)


def _stderr_print_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info",
    fmt: Literal["json", "console"] = "json",
    *,
    cache_loggers: bool = False,
) -> None:
    """Configure structlog for the process. `egress-gateway run` configures once and caches loggers on first use
    (`cache_loggers=True`); a cached logger keeps the configuration and the stream of its first use, so commands and
    tests that configure more than once leave it off."""
    renderer: Any
    factory: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = _stderr_bytes_logger
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


def decision_logger() -> Any:
    """The logger decision lines go through; one per recorder (it binds the configuration on first use)."""
    return structlog.get_logger(DECISION_LOGGER)


def log_decision(
    logger: Any, attributes: Mapping[str, AttributeValue], *, trace_id: str, span_id: str, name: str
) -> None:
    """One line per decision: the same fields as the span, plus its ids so log and trail can be joined."""
    logger.info(DECISION_EVENT, trace_id=trace_id, span_id=span_id, span_name=name, **attributes)


class RateLimitedWarning:
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
        structlog.get_logger("egress_gateway.audit").warning(self._event, count=pending, **fields)
