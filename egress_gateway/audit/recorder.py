"""The contract between the proxy and the audit trail.

The proxy opens one `ConnectionRecord` per CONNECT tunnel or plain-HTTP request, reports stages and the decision
on it, and closes it with byte counts. `Recorder` implementations (spans + logs + metrics in `audit/`) must never
raise into the data path and never block it. `NullRecord` stands in when a record cannot be opened.
"""

from __future__ import annotations

from typing import Any, Protocol

from egress_gateway.policy.decision import Decision, Facts
from egress_gateway.policy.engine import PolicySet


class ConnectionRecord(Protocol):
    def event(self, name: str, **attributes: Any) -> None:
        """A stage with its time: decided, resolved, upstream_connected, client_hello, closed."""

    def set(self, **attributes: Any) -> None:
        """Attributes learned along the way (e.g. network_peer_address, tls, http_response_status_code)."""

    def decided(self, facts: Facts, decision: Decision) -> None:
        """The (latest) decision for this connection; may be called twice (CONNECT, then SNI)."""

    def close(self, *, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        """End of the connection. Idempotent."""


class Recorder(Protocol):
    def open(self, kind: str, client_address: str, client_port: int) -> ConnectionRecord:
        """`kind` is the HTTP method: 'CONNECT' for tunnels, 'GET', 'POST', ... for plain HTTP."""

    def change_in_effect(self, change: str | None, policies: tuple[str, ...] = ()) -> None:
        """The change (policy edit, identity change, rule expiry) that revocations decided from now on are due to;
        None when it is over."""

    def policies_in_force(self, policies: PolicySet) -> None:
        """The policy set changed (or was first loaded): record what is in force before anything is decided by it."""

    def shutdown(self) -> None:
        """Flush and stop exporters."""


class NullRecord:
    def event(self, name: str, **attributes: Any) -> None:
        pass

    def set(self, **attributes: Any) -> None:
        pass

    def decided(self, facts: Facts, decision: Decision) -> None:
        pass

    def close(self, *, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        pass
