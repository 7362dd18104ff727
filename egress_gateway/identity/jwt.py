"""The shape of a bearer token, checked before anything is asked of the API server.

Owns: `parse_token(text) -> ParsedToken`, raising `MalformedToken`. A ServiceAccount token is a JWS in compact
serialization: three base64url segments (no padding, no whitespace) of which the first two decode to JSON objects.
Anything else is refused here, so junk never costs a TokenReview. The canonical form re-encodes the three decoded
segments: kube-apiserver's JOSE library strips whitespace and its base64 decoder ignores line breaks and unused
trailing bits, so it accepts one valid token in many spellings; keying the cache on the canonical form (and sending
that form to TokenReview) makes every spelling one cache entry and one review. The claims are UNVERIFIED: they may
only narrow a decision (refuse an expired or foreign token early) or describe a token TokenReview has accepted.
Imports nothing from the gateway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

MAX_TOKEN_BYTES = 16_384  # projected ServiceAccount tokens are about 1 KiB
_SEGMENT = r"[A-Za-z0-9_-]+"
_COMPACT_JWS = re.compile(rf"{_SEGMENT}\.{_SEGMENT}\.{_SEGMENT}")


class MalformedToken(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ParsedToken:
    canonical: str  # header.payload.signature, each segment re-encoded from its decoded bytes
    claims: dict[str, Any]  # unverified

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(self.canonical.encode()).hexdigest()

    @property
    def expiry(self) -> float | None:
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None

    @property
    def secret_name(self) -> str | None:
        """The Secret a legacy (Secret-based) ServiceAccount token was issued from."""
        name = self.claims.get("kubernetes.io/serviceaccount/secret.name")
        return name if isinstance(name, str) and name else None


def _decode(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedToken("a token segment is not base64url") from None


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise MalformedToken(f"the token's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedToken(f"the token's {what} is not a JSON object")
    return value


def parse_token(text: str) -> ParsedToken:
    """The canonical form and unverified claims of `text`, which must be exactly one compact JWS."""
    if len(text) > MAX_TOKEN_BYTES:
        raise MalformedToken(f"the token is longer than {MAX_TOKEN_BYTES} bytes")
    if _COMPACT_JWS.fullmatch(text) is None:
        raise MalformedToken("the token is not a JWT (three base64url segments joined by '.', nothing else)")
    header_text, payload_text, signature_text = text.split(".")
    header_bytes, payload_bytes, signature = _decode(header_text), _decode(payload_text), _decode(signature_text)
    header = _json_object(header_bytes, "header")
    claims = _json_object(payload_bytes, "payload")
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or not algorithm or algorithm.lower() == "none":
        raise MalformedToken("the token's header names no signing algorithm")
    if not signature:
        raise MalformedToken("the token carries no signature")
    canonical = f"{_encode(header_bytes)}.{_encode(payload_bytes)}.{_encode(signature)}"
    return ParsedToken(canonical=canonical, claims=claims)
