"""Every log line is redacted: credential-looking keys and `Basic`/`Bearer`/`Negotiate`/`Digest` values."""

from __future__ import annotations

from egress_gateway.audit.fields import NAMES, is_secret_key
from egress_gateway.audit.logs import REDACTED, redact_secrets


def test_credential_keys_and_values_are_redacted_and_the_rest_is_kept() -> None:
    line = {
        "event": "proxy_note",
        "Proxy-Authorization": "anything",
        "api_key": "k",
        "a": "Basic dXNlcjpwYXNz",
        "b": "bearer abc",
        "c": "NEGOTIATE YII",
        "d": "Digest username=x",
        "kept": "basically fine",
        "digest": "sha256:abc",
        "number": 3,
        "empty": "",
    }
    redacted = redact_secrets(None, "info", dict(line))
    assert redacted == {
        "event": "proxy_note",
        "Proxy-Authorization": REDACTED,
        "api_key": REDACTED,
        "a": REDACTED,
        "b": REDACTED,
        "c": REDACTED,
        "d": REDACTED,
        "kept": "basically fine",
        "digest": "sha256:abc",
        "number": 3,
        "empty": "",
    }


class _Text(str):
    pass


def test_values_of_familiar_keys_and_of_any_type_are_checked_too() -> None:
    line = {
        "event": "egress_decision",
        "egress.host_header": "Bearer abc",  # a familiar key, a value from the wire
        "egress.message": _Text("Basic dXNlcjpwYXNz"),  # a str subclass
        "egress.tls_alpn": ("h2", "bearer x"),  # an array: its items are not values that start a header
        "egress.big": 2**64,
        "server.address": "caf\udcff.example",
    }
    assert redact_secrets(None, "info", dict(line)) == {
        "event": "egress_decision",
        "egress.host_header": REDACTED,
        "egress.message": REDACTED,
        "egress.tls_alpn": ("h2", "bearer x"),
        "egress.big": str(2**64),
        "server.address": "caf\\xff.example",
    }


def test_no_attribute_name_looks_like_a_secret() -> None:
    """Redaction tests only the keys outside the attribute vocabulary: a name that looked like a secret would be
    trusted there."""
    assert [name for name in NAMES if is_secret_key(name)] == []
