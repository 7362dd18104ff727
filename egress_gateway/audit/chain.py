"""The trail's hash chain: how a record line is sealed, and how a sealed line is taken apart again for checking.

A sealed line is the record's JSON object with one last member, `chain`:

    {...record...,"chain":{"instance":"<writer id>","seq":<n>,"prev":"<64 hex>","alg":"sha256","hash":"<64 hex>"}}

`hash` = SHA-256(prev as 32 raw bytes || M), or HMAC-SHA256(key, prev || M) with `alg` "hmac-sha256", where M is
the line's own bytes up to (not including) `,"hash":"`: the record exactly as written plus the chain header, so
the instance id, sequence number and the link are covered too. Nothing is re-serialized: the writer hashes the
bytes it writes and the verifier hashes the bytes it reads. A quote inside any JSON string is escaped, so the last
`,"hash":"` of a line is always the chain's own. `Chain` owns the writer's side (instance, next sequence number,
last hash); `open_line` is the verifier's. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64  # the `prev` of the first record written to an empty trail
ALG_SHA256 = "sha256"
ALG_HMAC = "hmac-sha256"
_HASH_MARK = b',"hash":"'
_CHAIN_MARK = b',"chain":{'
_TAIL = b'"}}'


# hashlib releases the GIL for updates of 2048 bytes or more; on the writer thread that hands the GIL to the event
# loop once per record and back, which cost more than the hash itself (bench/audit_record.py). Smaller updates keep it.
_UPDATE_BYTES = 2000


def digest(prev: str, message: bytes, key: bytes | None) -> str:
    hasher = hashlib.sha256() if key is None else hmac.new(key, digestmod=hashlib.sha256)
    hasher.update(bytes.fromhex(prev))
    view = memoryview(message)
    for start in range(0, len(view), _UPDATE_BYTES):
        hasher.update(view[start : start + _UPDATE_BYTES])
    return hasher.hexdigest()


class Chain:
    """The writer's side: seals each line with the next sequence number, linked to the previous line's hash."""

    def __init__(self, *, key: bytes | None = None, prev: str = GENESIS, instance: str | None = None) -> None:
        self.instance = instance or str(uuid.uuid4())
        self.key = key
        self.alg = ALG_SHA256 if key is None else ALG_HMAC
        self.seq = 0  # the next record's
        self.prev = prev  # the last written record's hash (or the link of the first)

    def seal(self, body: bytes) -> bytes:
        """`body` is one orjson-encoded JSON object; returns the sealed line (no newline) and advances the chain."""
        header = orjson.dumps({"instance": self.instance, "seq": self.seq, "prev": self.prev, "alg": self.alg})
        message = body[:-1] + (_CHAIN_MARK[1:] if body == b"{}" else _CHAIN_MARK) + header[1:-1]
        hashed = digest(self.prev, message, self.key)
        self.seq += 1
        self.prev = hashed
        return message + _HASH_MARK + hashed.encode("ascii") + _TAIL


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
    at = line.rfind(_HASH_MARK)
    if at < 0 or not line.endswith(_TAIL) or len(line) - at != len(_HASH_MARK) + 64 + len(_TAIL):
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


def last_hash(tail: bytes) -> str | None:
    """The hash of the last sealed line in `tail` (the end of an existing trail file), None if there is none."""
    for line in reversed(tail.splitlines()):
        try:
            return open_line(line).hash
        except NotSealed:
            continue
    return None
