"""structlog setup (the one place logging is configured) and the per-decision log line.

`configure_logging(level, fmt)` renders JSON (production) or console (local) lines to stderr, with an ISO UTC
timestamp, and a redaction step that drops credential-looking keys and `Basic`/`Bearer` values from every
line. `log_decision` writes one `egress_decision` line with the span's attributes plus `trace_id`/`span_id`.
Must not import the proxy or the engine.

The decision line is written once per connection, so while the JSON chain `configure_logging` installed is the one
in force it is rendered here directly, byte for byte what that chain writes (same keys in the same order, the same
`json.dumps` text, the same timestamp format and clock, the same stream and lock), without a bound logger and an
event dict per line. Any line the chain would change in a way this renderer does not repeat (a key or value to
redact, a value that is not a plain str/bool/int/float, a colliding context variable), and any other configuration
(console, a test's `capture_logs`, `reset_defaults`), goes through structlog itself.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections.abc import Mapping, MutableMapping
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps (ensure_ascii) writes for a str
from typing import Any, Literal, NamedTuple

import structlog

from egress_gateway.audit.fields import AttributeValue, is_secret_key

REDACTED = "[redacted]"
_CREDENTIAL_PREFIXES = ("basic ", "bearer ", "negotiate ", "digest ")
_CREDENTIAL_FIRST = frozenset("bBnNdD")  # a cheap first test: most values cannot start like a credential

DECISION_EVENT = "egress_decision"
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
    global _json_chain
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.format_exc_info,
        renderer,
    ]
    min_level = getattr(logging, level.upper())
    wrapper_class = structlog.make_filtering_bound_logger(min_level)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper_class,
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    _json_chain = (
        _JsonChain(processors, list(processors), wrapper_class, min_level <= logging.INFO) if fmt == "json" else None
    )
    # The SDK's batch processor logs every dropped span; we count drops and log them rate-limited instead.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)


def log_decision(attributes: Mapping[str, AttributeValue], *, trace_id: str, span_id: str, name: str) -> None:
    """One line per decision: the same fields as the span, plus its ids so log and trail can be joined."""
    chain = _json_chain
    if chain is not None and chain.in_force():
        if not chain.info_enabled:
            return
        line = _render_decision_line(attributes, trace_id, span_id, name)
        if line is not None:
            _write(line)
            return
    fields: dict[str, Any] = {"trace_id": trace_id, "span_id": span_id, "span_name": name}
    fields.update(attributes)
    _decision_log.info(DECISION_EVENT, **fields)


class _JsonChain(NamedTuple):
    """What `configure_logging(fmt="json")` installed, to recognize that it is still what structlog uses."""

    processors: list[Any]
    snapshot: list[Any]  # a copy: an in-place edit of the installed list is a different chain
    wrapper_class: Any
    info_enabled: bool

    def in_force(self) -> bool:
        config = structlog.get_config()
        return (
            config["processors"] is self.processors
            and config["wrapper_class"] is self.wrapper_class
            and config["logger_factory"] is _stderr_logger
            and self.processors == self.snapshot
        )


_json_chain: _JsonChain | None = None

# Keys the decision line itself writes (or that structlog would handle differently): never rendered directly.
_RESERVED = frozenset(("trace_id", "span_id", "span_name", "event", "level", "timestamp"))
_MAX_CACHED_KEYS = 4096
_MAX_CACHED_ITEMS = 8192
_MAX_CACHED_VALUE = 256
# key -> '"key": ' as json.dumps writes it, for keys that are neither reserved nor credential-looking.
_key_fragments: dict[str, str] = {}
# (key, str value) -> '"key": "value"', for pairs the chain writes unchanged. Most of a line repeats from one
# connection to the next (namespace, pod, labels, destination, decision, policy, rule, message).
_string_items: dict[tuple[str, str], str] = {}
_EVENT_FRAGMENT = '"event": ' + _json_string(DECISION_EVENT)


def _key_fragment(key: str) -> str | None:
    if type(key) is not str or key in _RESERVED or is_secret_key(key):
        return None
    if len(_key_fragments) >= _MAX_CACHED_KEYS:
        _key_fragments.clear()
    fragment = _key_fragments[key] = _json_string(key) + ": "
    return fragment


def _value_json(value: Any) -> str | None:
    """`value` as json.dumps writes it, or None when the chain would redact it or it is not a plain primitive."""
    kind = type(value)
    if kind is str:
        if value[:1] in _CREDENTIAL_FIRST and value[:10].lower().startswith(_CREDENTIAL_PREFIXES):
            return None
        return _json_string(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return None


def _item(key: str, value: Any) -> str | None:
    """'"key": value' as the chain writes it, or None to leave the line to structlog."""
    fragment = _key_fragments.get(key) or _key_fragment(key)
    encoded = _value_json(value)
    if fragment is None or encoded is None:
        return None
    item = fragment + encoded
    if type(value) is str and len(value) <= _MAX_CACHED_VALUE:  # long values do not repeat; nor fill memory
        if len(_string_items) >= _MAX_CACHED_ITEMS:
            _string_items.clear()
        _string_items[key, value] = item
    return item


def _render_decision_line(
    attributes: Mapping[str, AttributeValue], trace_id: str, span_id: str, name: str
) -> str | None:
    """The line the JSON chain writes for this decision, or None to leave it to structlog."""
    ids = trace_id + span_id if type(trace_id) is str and type(span_id) is str else ""
    if ids.isascii() and ids.isalnum():  # hex ids (always): nothing to escape, nothing that looks like a credential
        parts = ['"trace_id": "' + trace_id + '"', '"span_id": "' + span_id + '"']
    else:
        parts = []
        for own_key, own_value in (("trace_id", trace_id), ("span_id", span_id)):
            own = _value_json(own_value)
            if own is None:
                return None
            parts.append(f'"{own_key}": {own}')
    span_name = _value_json(name)
    if span_name is None:
        return None
    parts.append('"span_name": ' + span_name)
    items = _string_items
    for key, value in attributes.items():
        item = (type(value) is str and items.get((key, value))) or _item(key, value)
        if item is None:
            return None
        parts.append(item)
    parts.append(_EVENT_FRAGMENT)
    context = structlog.contextvars.get_contextvars()
    for var_name, var_value in context.items():  # merge_contextvars adds them after the event (setdefault)
        if var_name in attributes:
            return None
        item = _item(var_name, var_value)
        if item is None:
            return None
        parts.append(item)
    parts.append('"level": "info"')
    parts.append('"timestamp": "' + _timestamp() + '"')
    return "{" + ", ".join(parts) + "}"


_second: tuple[int, str] = (-1, "")


def _timestamp() -> str:
    """What structlog's TimeStamper(fmt="iso", utc=True) writes: `datetime.now(UTC).isoformat()` with `Z`, from the
    same clock truncated to the microsecond the same way, and the date and time part computed once per second."""
    global _second
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    second = _second
    if second[0] != seconds:
        second = _second = (seconds, datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()[:19])
    microseconds = nanoseconds // 1000
    return f"{second[1]}.{microseconds:06d}Z" if microseconds else second[1] + "Z"


_printer: tuple[Any, structlog.PrintLogger] | None = None


def _write(line: str) -> None:
    """Through a `PrintLogger` on the current sys.stderr, as the configured `logger_factory` gives one."""
    global _printer
    stream = sys.stderr
    printer = _printer
    if printer is None or printer[0] is not stream:
        printer = _printer = (stream, _stderr_logger())
    printer[1].msg(line)
