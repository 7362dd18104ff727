"""What a denied client is told: status, one line, and a parseable RFC 9209 Proxy-Status."""

from __future__ import annotations

import pytest

from egress_gateway.policy.decision import Reason, adapter_denial
from egress_gateway.proxy.responses import denial, proxy_status


@pytest.mark.parametrize(
    ("reason", "status", "error"),
    [
        (Reason.DENIED_BY_RULE, 403, "http_request_denied"),
        (Reason.UNKNOWN_CLIENT, 403, "http_request_denied"),
        (Reason.BLOCKED_ADDRESS, 403, "destination_ip_prohibited"),
        (Reason.PRIVATE_ADDRESS, 403, "destination_ip_prohibited"),
        (Reason.DNS_ERROR, 502, "dns_error"),
        (Reason.DNS_TIMEOUT, 502, "dns_timeout"),
        (Reason.POLICIES_NOT_LOADED, 503, "proxy_internal_error"),
        (Reason.AUTH_REQUIRED, 407, "http_request_denied"),
    ],
)
def test_status_and_error_type(reason: Reason, status: int, error: str) -> None:
    response = denial(adapter_denial(reason, "why"))
    assert response.status_code == status
    assert response.headers["Proxy-Status"].startswith(f"egress-gateway; error={error}; ")
    assert response.content == f"{reason.value}: why\n".encode()
    assert response.headers["Connection"] == "close"


def test_407_carries_a_challenge() -> None:
    response = denial(adapter_denial(Reason.AUTH_REQUIRED, "token expired"))
    assert response.headers["Proxy-Authenticate"].startswith("Basic ")


def test_details_are_escaped_as_an_sf_string() -> None:
    value = proxy_status(Reason.DENIED_BY_RULE, 'rule "x" \\ matched caf\u00e9\r\n')
    details = value.split("details=", 1)[1]
    assert details.startswith('"') and details.endswith('"')
    assert '\\"x\\"' in details and "\\\\" in details
    assert all(" " <= ch <= "~" for ch in details)


def test_body_is_one_line_even_for_multi_line_messages() -> None:
    response = denial(adapter_denial(Reason.DENIED_BY_RULE, "first\nsecond"))
    assert response.content is not None and response.content.count(b"\n") == 1
