"""The trail's hash chain, writer's side (the construction: docs/audit.md, "Tamper evidence"; the verifier:
`trail/verify.py`). `Chain.seal` appends the `chain` member to an encoded record and hashes the line's own bytes, so
nothing is re-serialized. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid

import orjson

GENESIS = "0" * 64  # the `prev` of the first record written to an empty trail
ALG_SHA256 = "sha256"
ALG_HMAC = "hmac-sha256"
HASH_MARK = b',"hash":"'
_SEAL_AT_END = re.compile(rb',"hash":"([0-9a-f]{64})"}}$')


# hashlib releases the GIL for updates of 2048 bytes or more; on the writer thread that hands the GIL to the event
# loop once per record and back, which cost more than the hash itself (bench/audit_record.py). Smaller updates keep it.
_UPDATE_BYTES = 2000


def digest(prev: str, message: bytes, key: bytes | None) -> str:
    link = bytes.fromhex(prev)
    hasher = hashlib.sha256(link) if key is None else hmac.new(key, link, hashlib.sha256)
    for start in range(0, len(message), _UPDATE_BYTES):
        hasher.update(message[start : start + _UPDATE_BYTES])
    return hasher.hexdigest()


class Chain:
    """The writer's side: seals each line with the next sequence number, linked to the previous line's hash."""

    def __init__(self, *, key: bytes | None = None, prev: str = GENESIS, instance: str | None = None) -> None:
        self.instance = instance or str(uuid.uuid4())
        self.key = key
        self.alg = ALG_SHA256 if key is None else ALG_HMAC
        self.seq = 0  # the next record's
        self.prev = prev  # the last written record's hash (or the link of the first)
        # The chain member up to `seq`, and after `prev`: the same on every line (`instance` encoded by orjson).
        self._head = b',"chain":{' + orjson.dumps({"instance": self.instance})[1:-1] + b',"seq":'
        self._alg = b'","alg":' + orjson.dumps(self.alg)

    def seal(self, body: bytes) -> bytes:
        """`body` is one orjson-encoded JSON object; returns the sealed line (no newline) and advances the chain."""
        head = self._head[1:] if body == b"{}" else self._head
        message = b'%b%b%d,"prev":"%b%b' % (body[:-1], head, self.seq, self.prev.encode("ascii"), self._alg)
        hashed = digest(self.prev, message, self.key)
        self.seq += 1
        self.prev = hashed
        return b'%b%b%b"}}' % (message, HASH_MARK, hashed.encode("ascii"))


def last_hash(tail: bytes) -> str | None:
    """The hash of the last sealed line in `tail` (the end of an existing trail file), None if there is none. Only
    the seal's place is looked at: checking the line is `audit verify`'s job."""
    for line in reversed(tail.splitlines()):
        if sealed := _SEAL_AT_END.search(line):
            return sealed[1].decode("ascii")
    return None
