"""Metrics the sources and the span pipeline report, and the bound on label cardinality."""

from __future__ import annotations

import math

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from egress_gateway import metrics
from tests.audit.conftest import metric

ALLOWED_LABELS = {"namespace", "decision", "reason", "kind", "state", "direction", "source", "exporter"}


def test_only_bounded_labels_are_used() -> None:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    families = [f for f in text_string_to_metric_families(body.decode()) if f.name.startswith("egress_gateway_")]
    assert {f.name for f in families} >= {
        "egress_gateway_decisions",
        "egress_gateway_active_tunnels",
        "egress_gateway_bytes",
        "egress_gateway_decision_duration_seconds",
        "egress_gateway_policies",
        "egress_gateway_policy_source_staleness_seconds",
        "egress_gateway_watch_restarts",
        "egress_gateway_span_export_dropped",
    }
    for collector in (
        metrics.DECISIONS,
        metrics.WOULD_DENY,
        metrics.BYTES,
        metrics.POLICIES,
        metrics.SOURCE_STALENESS,
        metrics.SOURCE_READY,
        metrics.WATCH_RESTARTS,
        metrics.SPAN_EXPORT_DROPS,
        metrics.SPANS_EXPORTED,
    ):
        assert set(collector._labelnames) <= ALLOWED_LABELS, collector


def test_policy_counts_by_kind_and_state() -> None:
    metrics.set_policy_counts("EgressPolicy", loaded=12, invalid=1)
    metrics.set_policy_counts("EgressPolicy", loaded=11, invalid=2)
    assert metric("egress_gateway_policies", kind="EgressPolicy", state="loaded") == 11
    assert metric("egress_gateway_policies", kind="EgressPolicy", state="invalid") == 2


def test_source_staleness_and_readiness_are_read_at_scrape_time() -> None:
    staleness: list[float | None] = [None]
    ready = [False]
    metrics.track_source("files", lambda: staleness[0], lambda: ready[0])
    assert math.isnan(REGISTRY.get_sample_value("egress_gateway_policy_source_staleness_seconds", {"source": "files"}))  # type: ignore[arg-type]
    assert metric("egress_gateway_policy_source_ready", source="files") == 0
    staleness[0], ready[0] = 4.5, True
    assert metric("egress_gateway_policy_source_staleness_seconds", source="files") == 4.5
    assert metric("egress_gateway_policy_source_ready", source="files") == 1


def test_a_failing_source_callback_does_not_break_the_scrape() -> None:
    def broken() -> float:
        raise RuntimeError("source gone")

    metrics.track_source("kubernetes", broken, lambda: (_ for _ in ()).throw(RuntimeError("gone")))
    body, _ = metrics.render()
    assert b'egress_gateway_policy_source_staleness_seconds{source="kubernetes"} NaN' in body
    assert metric("egress_gateway_policy_source_ready", source="kubernetes") == 0


def test_watch_restarts_and_export_drops_count_up() -> None:
    before = metric("egress_gateway_watch_restarts_total", kind="EgressPolicy", reason="expired")
    metrics.watch_restarted("EgressPolicy", "expired")
    metrics.watch_restarted("EgressPolicy", "expired")
    assert metric("egress_gateway_watch_restarts_total", kind="EgressPolicy", reason="expired") == before + 2
    drops = metric("egress_gateway_span_export_dropped_total", exporter="otlp", reason="queue_full")
    metrics.span_export_dropped("otlp", "queue_full", 3)
    assert metric("egress_gateway_span_export_dropped_total", exporter="otlp", reason="queue_full") == drops + 3
