"""Verifying the trail's hash chain (`audit/chain.py`): every line sealed and intact, sequence numbers without gaps
or reversals, each record linked to the one before it, across rotated and gzip-compressed files.

Files are grouped by their rotation base name (`audit.jsonl.2.gz`, `audit.jsonl.1`, `audit.jsonl` are one trail,
oldest first) and each trail is checked as one stream. A problem names the file, line, instance and sequence number
of the record where the chain breaks, and what that means (edited, deleted, reordered, cut short). Pure reading:
must not import the proxy or the OpenTelemetry SDK.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import orjson

from egress_gateway.audit.chain import ALG_HMAC, GENESIS, HASH_MARK, digest
from egress_gateway.trail.read import _open_binary, _rotation_key, expand_paths

CHECKPOINT = "checkpoint"


class KeyRequired(ValueError):
    """The trail is HMAC-sealed and no key was given."""


@dataclass(frozen=True, slots=True)
class SealedLine:
    instance: str
    seq: int
    prev: str
    alg: str
    hash: str
    message: bytes  # what `hash` covers
    record: dict[str, Any]  # the whole line parsed, chain included

    def intact(self, key: bytes | None) -> bool:
        return hmac.compare_digest(digest(self.prev, self.message, key), self.hash)


class NotSealed(ValueError):
    """A line that is not a sealed trail record (cut short, not JSON, or without a chain)."""


def open_line(line: bytes) -> SealedLine:
    """Split a sealed line into what its hash covers and its chain fields. Raises `NotSealed`."""
    line = line.rstrip(b"\r\n")
    at = line.rfind(HASH_MARK)
    if at < 0 or not line.endswith(b'"}}') or len(line) - at != len(HASH_MARK) + 64 + 3:
        raise NotSealed("no chain hash at the end of the line (cut short or not written by the gateway)")
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise NotSealed(f"not JSON: {exc}") from None
    chain = record.get("chain") if isinstance(record, dict) else None
    if not isinstance(chain, dict):
        raise NotSealed("no chain member")
    try:
        sealed = SealedLine(
            instance=str(chain["instance"]),
            seq=int(chain["seq"]),
            prev=str(chain["prev"]),
            alg=str(chain["alg"]),
            hash=str(chain["hash"]),
            message=line[:at],
            record=record,
        )
        bytes.fromhex(sealed.prev)
        bytes.fromhex(sealed.hash)
    except (KeyError, TypeError, ValueError) as exc:
        raise NotSealed(f"malformed chain member: {exc!r}") from None
    if len(sealed.prev) != 64:
        raise NotSealed("malformed chain member: prev is not 64 hex digits")
    return sealed


@dataclass(slots=True)
class _Last:
    sealed: SealedLine
    where: str


@dataclass(slots=True)
class Verification:
    records: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _lines(paths: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        with _open_binary(path) as stream:
            for number, raw in enumerate(stream, start=1):
                if raw.strip():
                    yield f"{path}:{number}", raw


def _name(sealed: SealedLine) -> str:
    return f"instance {sealed.instance} seq {sealed.seq}"


def verify(sources: Sequence[str], key: bytes | None = None) -> Verification:
    """Check every trail among `sources` (files or directories). Raises OSError for a file that cannot be read,
    `KeyRequired` for an HMAC-sealed trail without `key`."""
    result = Verification()
    paths = [p for p in expand_paths(sources) if p != "-"]
    result.files = len(paths)
    for _base, group in groupby(paths, key=lambda p: _rotation_key(Path(p))[0]):
        _verify_trail(list(group), key, result)
    return result


def _verify_trail(paths: list[str], key: bytes | None, result: Verification) -> None:
    last: _Last | None = None
    ended: set[str] = set()  # instances whose chain was followed by another instance's
    problems = result.problems
    for where, raw in _lines(paths):
        try:
            sealed = open_line(raw)
        except NotSealed as exc:
            problems.append(f"{where}: not a sealed record ({exc}): cut short, inserted, or written by hand")
            continue
        result.records += 1
        if sealed.alg == ALG_HMAC and key is None:
            raise KeyRequired(f"{where}: the trail is sealed with HMAC-SHA256: pass --hmac-key-file")
        if key is not None and sealed.alg != ALG_HMAC:
            problems.append(f"{where}: {_name(sealed)}: sealed without the HMAC key (alg {sealed.alg}): rewritten")
        elif not sealed.intact(key):
            problems.append(f"{where}: {_name(sealed)}: edited: its hash does not match its content")
        if last is None:
            if sealed.seq != 0:
                result.notes.append(f"{where}: the trail begins at {_name(sealed)} (earlier records not given)")
            elif sealed.prev != GENESIS:
                result.notes.append(f"{where}: the trail begins with a link to a record not given")
        else:
            problem = _link_problem(last, sealed, ended)
            if problem:
                problems.append(f"{where}: {_name(sealed)}: {problem}")
            if sealed.instance != last.sealed.instance:
                ended.add(last.sealed.instance)
        last = _Last(sealed, where)
    if last is not None:
        record = last.sealed.record
        if record.get("recordType") != CHECKPOINT or not record.get("final"):
            result.notes.append(
                f"{last.where}: the trail ends without a final checkpoint (the writer is running, crashed, or the "
                "end was cut): compare its head with the last audit_checkpoint log line"
            )
        result.notes.append(f"{last.where}: head {_name(last.sealed)} hash {last.sealed.hash}")


def _link_problem(last: _Last, sealed: SealedLine, ended: set[str]) -> str | None:
    before = last.sealed
    if sealed.instance == before.instance:
        if sealed.seq <= before.seq:
            return f"out of order: comes after seq {before.seq} ({last.where})"
        if sealed.seq > before.seq + 1:
            missing = (
                f"seq {before.seq + 1}" if sealed.seq == before.seq + 2 else f"seq {before.seq + 1}..{sealed.seq - 1}"
            )
            return f"gap: {missing} missing after {last.where} (deleted or reordered)"
        if sealed.prev != before.hash:
            return (
                f"does not link to the record before it ({last.where}, seq {before.seq}): "
                "that one was edited or replaced"
            )
        return None
    if sealed.instance in ended:
        return f"out of order: instance {sealed.instance} resumes after instance {before.instance} ({last.where})"
    if sealed.seq != 0:
        return f"gap: the instance's first {sealed.seq} record(s) are missing (deleted or reordered)"
    if sealed.prev != before.hash:
        return f"does not link to the record before it ({last.where}, {_name(before)}): records between were deleted"
    return None
