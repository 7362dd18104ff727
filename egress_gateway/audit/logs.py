"""structlog setup (the one place logging is configured) and the per-decision log line.

`configure_logging(level, fmt)` renders JSON (production) or console (local) lines to stderr, with an ISO UTC
timestamp, and a redaction step that drops credential-looking keys and `Basic`/`Bearer` values from every
line. `log_decision` writes one `egress_decision` line with the span's attributes plus `trace_id`/`span_id`.
Must not import the proxy or the engine.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog

from egress_gateway.audit.fields import AttributeValue, is_secret_key

REDACTED = "[redacted]"
_CREDENTIAL_PREFIXES = ("basic ", "bearer ", "negotiate ", "digest ")
_CREDENTIAL_FIRST = frozenset("bBnNdD")  # a cheap first test: most values cannot start like a credential

_decision_log = structlog.get_logger("egress_gateway.audit")


def redact_secrets(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: never let a credential reach a log line, whoever logged it."""
    for key, value in event_dict.items():  # replacing values (not keys) while iterating is safe
        secret_key = key != "event" and is_secret_key(key)
        if secret_key or (
            isinstance(value, str)
            and value[:1] in _CREDENTIAL_FIRST
            and value[:10].lower().startswith(_CREDENTIAL_PREFIXES)
        ):
            event_dict[key] = REDACTED
    return event_dict


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    # Resolved per logger, not once: whoever replaces sys.stderr later (a test's capture) is followed.
    return structlog.PrintLogger(sys.stderr)


def configure_logging(
    level: Literal["debug", "info", "warning", "error"] = "info", fmt: Literal["json", "console"] = "json"
) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
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
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # The SDK's batch processor logs every dropped span; we count drops and log them rate-limited instead.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


def log_decision(attributes: Mapping[str, AttributeValue], *, trace_id: str, span_id: str, name: str) -> None:
    """One line per decision: the same fields as the span, plus its ids so log and trail can be joined."""
    fields: dict[str, Any] = {"trace_id": trace_id, "span_id": span_id, "span_name": name}
    fields.update(attributes)
    _decision_log.info("egress_decision", **fields)
