"""Prometheus metrics of the gateway, on prometheus-client's default REGISTRY (served at the admin
`/metrics`).

Owns every metric definition and the small functions the proxy, the sources and the span pipeline call. Label
cardinality is bounded on purpose: namespace, decision, reason, kind, direction, source, exporter; never a
host, a pod or an address. Imports prometheus-client only; must not import the proxy, the sources or the
engine.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

UNKNOWN_NAMESPACE = "_unknown"  # not a valid namespace name, so it cannot collide with a real one

DECISIONS = Counter(
    "egress_gateway_decisions",
    "Connections decided, by client namespace, verdict and reason (a later decision on the same connection, "
    "e.g. a tunnel denied for its TLS SNI, counts again only when it changes the outcome).",
    ["namespace", "decision", "reason"],
)
WOULD_DENY = Counter(
    "egress_gateway_would_deny",
    "Connections an Audit-mode policy allowed but would have denied, by client namespace and reason.",
    ["namespace", "reason"],
)
ACTIVE_TUNNELS = Gauge("egress_gateway_active_tunnels", "CONNECT tunnels currently open.")
ACTIVE_REQUESTS = Gauge("egress_gateway_active_http_requests", "Plain-HTTP requests currently in flight.")
BYTES = Counter(
    "egress_gateway_bytes",
    "Payload bytes relayed, by direction (sent = client to upstream, received = upstream to client).",
    ["namespace", "direction"],
)
DECISION_SECONDS = Histogram(
    "egress_gateway_decision_duration_seconds",
    "Time from accepting a connection to its first decision (identity, parsing and policy evaluation).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
POLICIES = Gauge(
    "egress_gateway_policies",
    "Policy objects known to the gateway, by kind and state (loaded = in force, invalid = rejected).",
    ["kind", "state"],
)
SOURCE_STALENESS = Gauge(
    "egress_gateway_policy_source_staleness_seconds",
    "Seconds since the policy source last synced successfully (NaN before the first sync).",
    ["source"],
)
SOURCE_READY = Gauge(
    "egress_gateway_policy_source_ready", "1 once the policy source's first load finished.", ["source"]
)
WATCH_RESTARTS = Counter(
    "egress_gateway_watch_restarts",
    "Restarts of a Kubernetes watch, by kind and reason (expired = 410 Gone relist, error, timeout).",
    ["kind", "reason"],
)
SPAN_EXPORT_DROPS = Counter(
    "egress_gateway_span_export_dropped",
    "Audit spans lost before reaching an exporter (queue_full), rejected by it (export_failed; with OTLP retries: "
    "still undelivered at shutdown), pushed out of the OTLP retry buffer (buffer_full), or that the trail file "
    "could not encode (encode_failed).",
    ["exporter", "reason"],
)
SPAN_EXPORT_RETRIES = Counter(
    "egress_gateway_span_export_retries",
    "Retries of a failed OTLP export from the retry buffer (each a try of the oldest buffered batch).",
    ["exporter"],
)
SPANS_EXPORTED = Counter(
    "egress_gateway_spans_exported", "Audit spans handed to an exporter successfully.", ["exporter"]
)


def namespace_label(namespace: str | None) -> str:
    return namespace or UNKNOWN_NAMESPACE


@functools.lru_cache(maxsize=4096)
def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: the per-connection metrics are updated with a handful of label sets."""
    return metric.labels(*labels)


def record_decision(namespace: str | None, decision: str, reason: str, *, would_deny_reason: str | None = None) -> None:
    ns = namespace_label(namespace)
    _child(DECISIONS, ns, decision, reason).inc()
    if would_deny_reason is not None:
        _child(WOULD_DENY, ns, would_deny_reason).inc()


def observe_decision_latency(seconds: float) -> None:
    DECISION_SECONDS.observe(max(seconds, 0.0))


def connection_opened(kind: str) -> None:
    (ACTIVE_TUNNELS if kind == "CONNECT" else ACTIVE_REQUESTS).inc()


def connection_closed(kind: str, namespace: str | None, bytes_sent: int, bytes_received: int) -> None:
    (ACTIVE_TUNNELS if kind == "CONNECT" else ACTIVE_REQUESTS).dec()
    ns = namespace_label(namespace)
    if bytes_sent > 0:
        _child(BYTES, ns, "sent").inc(bytes_sent)
    if bytes_received > 0:
        _child(BYTES, ns, "received").inc(bytes_received)


def set_policy_counts(kind: str, *, loaded: int, invalid: int) -> None:
    """Called by a source after each (re)load with the totals for one kind."""
    POLICIES.labels(kind=kind, state="loaded").set(loaded)
    POLICIES.labels(kind=kind, state="invalid").set(invalid)


def track_source(source: str, staleness_seconds: Callable[[], float | None], ready: Callable[[], bool]) -> None:
    """Read staleness and readiness from the source at scrape time (`source` is "files" or "kubernetes")."""

    def _staleness() -> float:
        try:
            value = staleness_seconds()
        except Exception:
            return math.nan
        return math.nan if value is None else float(value)

    def _ready() -> float:
        try:
            return 1.0 if ready() else 0.0
        except Exception:
            return 0.0

    SOURCE_STALENESS.labels(source=source).set_function(_staleness)
    SOURCE_READY.labels(source=source).set_function(_ready)


def watch_restarted(kind: str, reason: str) -> None:
    WATCH_RESTARTS.labels(kind=kind, reason=reason).inc()


def span_export_dropped(exporter: str, reason: str, count: int = 1) -> None:
    SPAN_EXPORT_DROPS.labels(exporter=exporter, reason=reason).inc(count)


def span_export_retried(exporter: str) -> None:
    SPAN_EXPORT_RETRIES.labels(exporter=exporter).inc()


def spans_exported(exporter: str, count: int) -> None:
    SPANS_EXPORTED.labels(exporter=exporter).inc(count)


def render() -> tuple[bytes, str]:
    """The `/metrics` body and its content type, for the admin listener."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ---- workload identity (issue 18): defined here with the others, updated by identity/ and kube/workloads.py
POD_IP_CONFLICTS = Counter(
    "egress_gateway_pod_ip_conflicts",
    "Times a pod listed an address another live pod already listed (the most recent claim owns the address).",
)
POD_IP_IDENTITY_TRUSTED = Gauge(
    "egress_gateway_pod_ip_identity_trusted",
    "1 while pod-IP identities are served; 0 while the pod index is out of touch with the API server for longer "
    "than identity.max_staleness_s (or not synced yet): such clients are unknown_client.",
)
TOKEN_REVIEWS = Counter(
    "egress_gateway_token_reviews",
    "ServiceAccount tokens presented, by outcome: cached, approved, rejected (by TokenReview), refused_locally "
    "(malformed, expired, revoked, wrong address), rate_limited, error (TokenReview could not be made).",
    ["outcome"],
)


def pod_ip_conflict() -> None:
    POD_IP_CONFLICTS.inc()


def pod_ip_identity_trusted(trusted: bool) -> None:
    POD_IP_IDENTITY_TRUSTED.set(1.0 if trusted else 0.0)


def token_review(outcome: str) -> None:
    _child(TOKEN_REVIEWS, outcome).inc()
