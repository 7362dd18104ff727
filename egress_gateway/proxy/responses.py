"""What a denied client is told: HTTP status, one plain-text line, and an RFC 9209 `Proxy-Status` header.

Owns the mapping reason -> (status, Proxy-Status error type) and the response bytes' shape. Imports the decision
types and mitmproxy's `http.Response` only.
"""

from __future__ import annotations

from mitmproxy import http

from egress_gateway.policy.decision import Decision, Reason

PROXY_NAME = "egress-gateway"
PROXY_AUTHENTICATE = f'Basic realm="{PROXY_NAME}"'

# reason -> (HTTP status, RFC 9209 error type)
_STATUS: dict[Reason, tuple[int, str]] = {
    Reason.BLOCKED_ADDRESS: (403, "destination_ip_prohibited"),
    Reason.PRIVATE_ADDRESS: (403, "destination_ip_prohibited"),
    Reason.SELF_CONNECT: (403, "destination_ip_prohibited"),
    Reason.DESTINATION_MISMATCH: (403, "destination_ip_prohibited"),
    Reason.NO_SNI: (400, "http_request_error"),
    Reason.INVALID_TARGET: (400, "http_request_error"),
    Reason.BAD_REQUEST: (400, "http_request_error"),
    Reason.DNS_ERROR: (502, "dns_error"),
    Reason.DNS_TIMEOUT: (502, "dns_timeout"),
    Reason.CONNECTION_REFUSED: (502, "connection_refused"),
    Reason.CONNECTION_TIMEOUT: (504, "connection_timeout"),
    Reason.POLICIES_NOT_LOADED: (503, "proxy_internal_error"),
    Reason.CONNECTION_LIMIT: (503, "connection_limit_reached"),
    Reason.RATE_LIMITED: (429, "connection_limit_reached"),
    Reason.AUTH_REQUIRED: (407, "http_request_denied"),
    Reason.CLIENT_TIMEOUT: (408, "http_request_error"),
    Reason.URI_TOO_LONG: (414, "http_request_error"),
    Reason.HEADERS_TOO_LARGE: (431, "http_request_error"),
}
_DEFAULT = (403, "http_request_denied")


def status_for(reason: Reason) -> tuple[int, str]:
    return _STATUS.get(reason, _DEFAULT)


def _sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII, with backslash and double quote escaped."""
    printable = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def proxy_status(reason: Reason, message: str) -> str:
    _, error = status_for(reason)
    return f"{PROXY_NAME}; error={error}; details={_sf_string(f'{reason.value}: {message}')}"


def denial(decision: Decision) -> http.Response:
    """The response for a denied CONNECT or plain-HTTP request. The connection is closed after it."""
    status, _ = status_for(decision.reason)
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "Proxy-Status": proxy_status(decision.reason, decision.message),
        "Connection": "close",
    }
    if decision.reason is Reason.AUTH_REQUIRED:
        headers["Proxy-Authenticate"] = PROXY_AUTHENTICATE
    line = " ".join(f"{decision.reason.value}: {decision.message}".split())
    return http.Response.make(status, (line + "\n").encode("utf-8", "replace"), headers)
