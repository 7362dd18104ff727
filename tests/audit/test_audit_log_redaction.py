"""Every log line is redacted: credential-looking keys and `Basic`/`Bearer`/`Negotiate`/`Digest` values."""

from __future__ import annotations

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
