"""The per-decision log line (docs/audit.md), and `redact_secrets`, the structlog step every log line of the process
passes (`egress_gateway/logging.py` configures it), so no credential and no value from the wire can reach or break a
line. Must not import the proxy or the engine.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import orjson
import structlog

from egress_gateway.audit import fields
from egress_gateway.audit.fields import AttributeValue, is_secret_key, safe_text

REDACTED = "[redacted]"
_CREDENTIAL_PREFIXES = ("basic ", "bearer ", "negotiate ", "digest ")
_CREDENTIAL_VALUE = re.compile(rb'":"(?:basic|bearer|negotiate|digest) ')  # in a lowered JSON object
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1

DECISION_EVENT = "egress_decision"
DECISION_LOGGER = "egress_gateway.audit"
# Keys known not to name a secret (the attribute vocabulary, the line's own); only the others are tested.
_FAMILIAR_KEYS = frozenset((*fields.NAMES, "trace_id", "span_id", "span_name", "event", "level", "timestamp"))


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: never let a credential reach a log line, whoever logged it; and write text that is not
    valid Unicode (a byte from the wire that was not UTF-8, kept as a lone surrogate) escaped, and an integer JSON
    cannot hold exactly as text, instead of failing the line."""
    if not any(map(is_secret_key, event_dict.keys() - _FAMILIAR_KEYS)):
        try:  # most lines need nothing: one JSON encoding tells (orjson refuses a lone surrogate, an integer over
            encoded = orjson.dumps(event_dict)  # 64 bits, an unknown type); a false match only costs the loop below
            if encoded.isascii() and _CREDENTIAL_VALUE.search(encoded.lower()) is None:
                return event_dict
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
    for key, value in event_dict.items():  # replacing values (not keys) while iterating is safe
        if key != "event" and is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            if value[:10].lower().startswith(_CREDENTIAL_PREFIXES):
                event_dict[key] = REDACTED
            elif not value.isascii():
                event_dict[key] = safe_text(value)
        elif type(value) is int and not _INT64_MIN <= value <= _UINT64_MAX:
            event_dict[key] = str(value)
    return event_dict


def decision_logger() -> Any:
    """The logger decision lines go through, one per recorder: the bound logger itself when loggers are cached on first
    use (as `run` configures; it saves the lazy proxy's steps per line), else the proxy (it follows reconfiguration)."""
    logger = structlog.get_logger(DECISION_LOGGER)
    return logger.bind() if structlog.get_config()["cache_logger_on_first_use"] else logger


def log_decision(
    logger: Any, attributes: Mapping[str, AttributeValue], *, trace_id: str, span_id: str, name: str
) -> None:
    """One line per decision: the same fields as the span, plus its ids so log and trail can be joined. (Bound
    rather than passed to `info`: structlog copies a context dict in C, keyword arguments once per call level.)"""
    logger.bind(trace_id=trace_id, span_id=span_id, span_name=name, **attributes).info(DECISION_EVENT)


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
