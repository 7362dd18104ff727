"""Reading the JSON-lines audit trail: files (plain, gzip, rotated) or stdin -> `FlowRecord`s, filters, summaries.

Owns: decoding OTLP/JSON span lines (AnyValue attributes), ordering rotated files oldest first, relative and
absolute time bounds, `FlowFilter`, and the `--summary` grouping. Bad lines are counted and skipped, never fatal.
Pure reading: imports `fields` and the engine's reason codes only; must not import the proxy, the sources or
the OpenTelemetry SDK.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from egress_gateway.audit import fields
from egress_gateway.policy.decision import Reason

# Reasons the policy engine produces. Other reasons (dns_error, connection_refused, rate_limited, revoked, ...) are
# outcomes decided around the engine; a record's policy verdict is its last decision with one of these.
ENGINE_REASONS = frozenset(
    str(r.value)
    for r in (
        Reason.INVALID_TARGET,
        Reason.SNI_MISMATCH,
        Reason.HOST_MISMATCH,
        Reason.UNKNOWN_CLIENT,
        Reason.BLOCKED_ADDRESS,
        Reason.PRIVATE_ADDRESS,
        Reason.DENIED_BY_RULE,
        Reason.ALLOWED_BY_RULE,
        Reason.NO_MATCHING_RULE,
        Reason.NO_POLICY,
    )
)

GZIP_MAGIC = b"\x1f\x8b"
MAX_REPORTED_BAD_LINES = 20
STATUS_ERROR = 2
_ROTATION_RE = re.compile(r"^(?P<base>.+?)(?:\.(?P<index>\d+))?(?:\.gz)?$")
_RELATIVE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def any_value(value: Mapping[str, Any]) -> Any:
    """Decode an OTLP/JSON AnyValue."""
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "arrayValue" in value:
        return [any_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return {kv["key"]: any_value(kv.get("value", {})) for kv in value["kvlistValue"].get("values", [])}
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def decode_attributes(items: Iterable[Mapping[str, Any]] | None) -> dict[str, Any]:
    return {item["key"]: any_value(item.get("value", {})) for item in items or ()}


def _nanos_to_datetime(nanos: int) -> datetime:
    return datetime.fromtimestamp(nanos / 1e9, tz=UTC)


@dataclass(frozen=True, slots=True)
class FlowEvent:
    name: str
    time: datetime
    attributes: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    """What the policy engine decided for a connection, whatever happened to it afterwards."""

    decision: str  # allow | deny
    reason: str
    policy: str | None = None
    rule: str | None = None
    would_deny: bool = False

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any]) -> PolicyVerdict | None:
        decision, reason = attributes.get(fields.DECISION), attributes.get(fields.REASON)
        if decision not in ("allow", "deny") or reason not in ENGINE_REASONS:
            return None
        policy, rule = attributes.get(fields.POLICY), attributes.get(fields.RULE)
        return cls(
            decision=str(decision),
            reason=str(reason),
            policy=None if policy is None else str(policy),
            rule=None if rule is None else str(rule),
            would_deny=attributes.get(fields.WOULD_DENY) is True,
        )


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One recorded connection (one span line of the trail)."""

    trace_id: str
    span_id: str
    name: str
    start: datetime
    end: datetime
    attributes: Mapping[str, Any]
    status_code: int = 0
    status_message: str = ""
    events: tuple[FlowEvent, ...] = ()
    resource: Mapping[str, Any] = field(default_factory=dict)
    closed: bool = True  # False: only its `open` record is in the trail (still open, or the gateway died)

    @classmethod
    def from_open(cls, obj: Mapping[str, Any]) -> FlowRecord:
        """A connection known only from its `open` record (decision time); its end is unknown."""
        attributes = decode_attributes(obj.get("attributes"))
        at = _nanos_to_datetime(int(obj.get("timeUnixNano", 0)))
        return cls(
            trace_id=str(obj.get("traceId", "")),
            span_id=str(obj.get("spanId", "")),
            name=str(obj.get("name", "")),
            start=at,
            end=at,
            attributes=attributes,
            status_code=STATUS_ERROR if attributes.get(fields.DECISION) == "deny" else 0,
            status_message=str(attributes.get(fields.MESSAGE, "")) if attributes.get(fields.DECISION) == "deny" else "",
            closed=False,
        )

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FlowRecord:
        status = obj.get("status") or {}
        code = status.get("code", 0)
        if isinstance(code, str):  # enum names, in case a producer wrote them that way
            code = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}.get(code, 0)
        return cls(
            trace_id=str(obj.get("traceId", "")),
            span_id=str(obj.get("spanId", "")),
            name=str(obj.get("name", "")),
            start=_nanos_to_datetime(int(obj.get("startTimeUnixNano", 0))),
            end=_nanos_to_datetime(int(obj.get("endTimeUnixNano", obj.get("startTimeUnixNano", 0)))),
            attributes=decode_attributes(obj.get("attributes")),
            status_code=int(code),
            status_message=str(status.get("message", "")),
            events=tuple(
                FlowEvent(
                    name=str(e.get("name", "")),
                    time=_nanos_to_datetime(int(e.get("timeUnixNano", 0))),
                    attributes=decode_attributes(e.get("attributes")),
                )
                for e in obj.get("events", [])
            ),
            resource=decode_attributes((obj.get("resource") or {}).get("attributes")),
        )

    def _str(self, key: str) -> str | None:
        value = self.attributes.get(key)
        return None if value is None else str(value)

    @property
    def method(self) -> str:
        return self._str(fields.HTTP_METHOD) or self.name.removeprefix("egress ")

    @property
    def namespace(self) -> str | None:
        return self._str(fields.K8S_NAMESPACE)

    @property
    def pod(self) -> str | None:
        return self._str(fields.K8S_POD)

    @property
    def host(self) -> str | None:
        return self._str(fields.SERVER_ADDRESS)

    @property
    def port(self) -> int | None:
        value = self.attributes.get(fields.SERVER_PORT)
        return int(value) if isinstance(value, int | str) and str(value).isdigit() else None

    @property
    def destination(self) -> str:
        host = self.host or "?"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}" if self.port is not None else host

    @property
    def sni(self) -> str | None:
        return self._str(fields.TLS_SERVER_NAME)

    @property
    def peer_address(self) -> str | None:
        return self._str(fields.NETWORK_PEER_ADDRESS)

    @property
    def decision(self) -> str | None:
        return self._str(fields.DECISION)

    @property
    def reason(self) -> str | None:
        return self._str(fields.REASON)

    @property
    def policy(self) -> str | None:
        return self._str(fields.POLICY)

    @property
    def policy_version(self) -> str | None:
        return self._str(fields.POLICY_VERSION)

    @property
    def rule(self) -> str | None:
        return self._str(fields.RULE)

    @property
    def would_deny(self) -> bool:
        return self.attributes.get(fields.WOULD_DENY) is True

    @property
    def policy_verdict(self) -> PolicyVerdict | None:
        """The engine's last decision: the final one, or, when the connection ended on an outcome decided around
        the engine (connection_refused, revoked, ...), the last `decided` event the engine made. None when the
        engine never decided (e.g. a DNS failure or a rate limit before it)."""
        final = PolicyVerdict.from_attributes(self.attributes)
        if final is not None:
            return final
        for event in reversed(self.events):
            if event.name == "decided":
                verdict = PolicyVerdict.from_attributes(event.attributes)
                if verdict is not None:
                    return verdict
        return None

    @property
    def pod_labels(self) -> dict[str, str]:
        return _prefixed(self.attributes, fields.K8S_POD_LABEL_PREFIX)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return _prefixed(self.attributes, fields.K8S_NAMESPACE_LABEL_PREFIX)

    def flat(self) -> dict[str, Any]:
        """A flat dict for json/csv output: ids, times, then every attribute under its own name."""
        out: dict[str, Any] = {
            "time": self.start.isoformat(),
            "end_time": self.end.isoformat(),
            "duration_ms": round((self.end - self.start).total_seconds() * 1000, 3),
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "name": self.name,
            "status": {0: "unset", 1: "ok", 2: "error"}.get(self.status_code, str(self.status_code)),
        }
        if not self.closed:
            out["never_closed"] = True
        out.update(self.attributes)
        return out


def _prefixed(attributes: Mapping[str, Any], prefix: str) -> dict[str, str]:
    return {k[len(prefix) :]: str(v) for k, v in attributes.items() if k.startswith(prefix)}


# ---- files -----------------------------------------------------------------------------------------------------


def _rotation_key(path: Path) -> tuple[str, int, str]:
    """`audit.jsonl.3.gz` before `audit.jsonl.1` before `audit.jsonl`: oldest first within one base name."""
    match = _ROTATION_RE.match(path.name)
    assert match is not None
    index = int(match.group("index")) if match.group("index") else 0
    return (str(path.parent / match.group("base")), -index, path.name)


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files as given; a directory becomes its (non-hidden) files; rotated siblings are ordered oldest first."""
    out: list[str] = []
    for text in paths:
        if text == "-":
            out.append(text)
            continue
        path = Path(text)
        if path.is_dir():
            children = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
            out.extend(str(p) for p in sorted(children, key=_rotation_key))
        else:
            out.append(text)
    files = [p for p in out if p != "-"]
    ordered = sorted(files, key=lambda p: _rotation_key(Path(p)))
    return ordered + (["-"] if "-" in out else [])


def _open_binary(source: str) -> io.BufferedIOBase:
    """The decompressed byte stream of a file or stdin; gzip is recognized by its magic bytes, not the name."""
    raw: Any = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    buffered: io.BufferedReader = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)
    if buffered.peek(2)[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=buffered)
    return buffered


@dataclass(slots=True)
class ReadStats:
    files: int = 0
    lines: int = 0
    records: int = 0
    skipped: int = 0
    bad_lines: list[str] = field(default_factory=list)  # "file:line: problem", the first MAX_REPORTED only

    def bad(self, where: str, problem: str) -> None:
        if len(self.bad_lines) < MAX_REPORTED_BAD_LINES:
            self.bad_lines.append(f"{where}: {problem}")
        self.skipped += 1


def read_records(sources: Sequence[str], stats: ReadStats | None = None) -> Iterator[FlowRecord]:
    """Every connection of every source: its span line (the close record) in file order, then the connections
    whose `open` record has no span line (opened and never closed), oldest first. Raises OSError for a file that
    cannot be opened."""
    stats = stats if stats is not None else ReadStats()
    opened: dict[tuple[str, str], Mapping[str, Any]] = {}  # open records not yet closed
    yield from _read_closed(sources, stats, opened)
    for obj in opened.values():
        stats.records += 1
        yield FlowRecord.from_open(obj)


def _read_closed(
    sources: Sequence[str], stats: ReadStats, opened: dict[tuple[str, str], Mapping[str, Any]]
) -> Iterator[FlowRecord]:
    for source in expand_paths(sources) if sources else ["-"]:
        stats.files += 1
        with _open_binary(source) as stream:
            name = "<stdin>" if source == "-" else source
            for number, raw in enumerate(stream, start=1):
                line = raw.strip()
                if not line:
                    continue
                stats.lines += 1
                try:
                    obj = json.loads(line)
                    if isinstance(obj, dict) and "recordType" in obj:  # open, checkpoint, ...
                        if obj["recordType"] == "open":
                            opened[(str(obj.get("traceId")), str(obj.get("spanId")))] = obj
                        continue
                    if not isinstance(obj, dict) or "traceId" not in obj:
                        raise ValueError("not an OTLP span object (no traceId)")
                    record = FlowRecord.from_json(obj)
                    opened.pop((record.trace_id, record.span_id), None)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    stats.bad(f"{name}:{number}", str(exc)[:120])
                    continue
                stats.records += 1
                yield record


# ---- filters ---------------------------------------------------------------------------------------------------


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """`1h`, `30m`, `2d`, `90s`, `1w` ago, or an ISO 8601 instant (UTC when no offset is given)."""
    now = now or datetime.now(UTC)
    match = _RELATIVE_RE.match(text)
    if match:
        amount, unit = float(match.group(1)), match.group(2).lower()
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use a duration ago (30m, 1h, 2d, 1w) or ISO 8601 (2026-11-26T10:00:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class FlowFilter:
    namespace: str | None = None
    pod: str | None = None  # glob
    decision: str | None = None  # allow | deny
    reason: str | None = None
    host: str | None = None  # glob, case-insensitive
    would_deny: bool = False
    since: datetime | None = None
    until: datetime | None = None
    policy: str | None = None  # "Kind/ns/name", "ns/name" or "name"
    rule: str | None = None
    never_closed: bool = False

    def matches(self, record: FlowRecord) -> bool:
        if self.never_closed and record.closed:
            return False
        return self._matches(record)

    def _matches(self, record: FlowRecord) -> bool:
        if self.namespace is not None and record.namespace != self.namespace:
            return False
        if self.pod is not None and not fnmatch.fnmatchcase(record.pod or "", self.pod):
            return False
        if self.decision is not None and record.decision != self.decision:
            return False
        if self.reason is not None and record.reason != self.reason:
            return False
        if self.host is not None and not any(
            fnmatch.fnmatchcase(str(name).lower(), self.host.lower())
            for name in (record.host or "", record.attributes.get(fields.SERVER_ADDRESS_UNICODE) or "")
        ):
            return False
        if self.would_deny and not record.would_deny:
            return False
        if self.since is not None and record.start < self.since:
            return False
        if self.until is not None and record.start > self.until:
            return False
        if self.policy is not None and not _policy_matches(self.policy, record):
            return False
        return self.rule is None or self.rule in (record.rule, record.attributes.get(fields.WOULD_DENY_RULE))


def _policy_matches(wanted: str, record: FlowRecord) -> bool:
    """The deciding policy, every policy that took part in the decision (`egress.deciders`, also in the connection's
    earlier `decided` events), the Audit-mode policy that would deny it, or a policy whose change revoked it."""
    return any(ref == wanted or ref.endswith("/" + wanted) for ref in _policies_of(record))


def _policies_of(record: FlowRecord) -> Iterator[str]:
    attributes = record.attributes
    for ref in (record.policy, attributes.get(fields.WOULD_DENY_POLICY)):
        if ref:
            yield str(ref)
    for source in (attributes, *(event.attributes for event in record.events if event.name == "decided")):
        deciders = source.get(fields.DECIDERS)
        if deciders:  # "Namespace: EgressPolicy/shop/payments (version 3) rule api -> Allow; ..."
            for decider in str(deciders).split("; "):
                yield decider.partition(": ")[2].partition(" (version ")[0]
        if source.get(fields.POLICY):
            yield str(source[fields.POLICY])
    changed = attributes.get(fields.CHANGE_POLICIES)
    if changed:
        yield from str(changed).split("; ")


# ---- summary ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SummaryRow:
    namespace: str
    destination: str
    decision: str
    count: int = 0
    would_deny: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    first_seen: datetime | None = None
    last_seen: datetime | None = None

    def add(self, record: FlowRecord) -> None:
        self.count += 1
        self.would_deny += record.would_deny
        self.reasons[record.reason or "-"] += 1
        if self.first_seen is None or record.start < self.first_seen:
            self.first_seen = record.start
        if self.last_seen is None or record.start > self.last_seen:
            self.last_seen = record.start

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "destination": self.destination,
            "decision": self.decision,
            "count": self.count,
            "would_deny": self.would_deny,
            "reasons": ",".join(f"{r}={n}" for r, n in self.reasons.most_common()),
            "first_seen": self.first_seen.isoformat() if self.first_seen else "",
            "last_seen": self.last_seen.isoformat() if self.last_seen else "",
        }


def summarize(records: Iterable[FlowRecord], top: int | None = None) -> list[SummaryRow]:
    """Counts grouped by (namespace, destination, decision), most frequent first."""
    rows: dict[tuple[str, str, str], SummaryRow] = {}
    for record in records:
        key = (record.namespace or "-", record.destination, record.decision or "-")
        row = rows.get(key)
        if row is None:
            row = rows[key] = SummaryRow(*key)
        row.add(record)
    ordered = sorted(rows.values(), key=lambda r: (-r.count, r.namespace, r.destination, r.decision))
    return ordered[:top] if top else ordered
