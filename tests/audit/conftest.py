"""Shared fixtures for the audit tests: a recorder wired to the SDK's in-memory exporter, and metric reading."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest
import structlog
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from egress_gateway.audit import build_recorder
from egress_gateway.audit.spans import SpanRecorder, build_tracer_provider
from egress_gateway.policy.decision import Decision, Facts, Identity, PolicyRef, Reason
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.store import PolicyStore
from egress_gateway.settings import AuditSettings, Settings
from egress_gateway.sources.files import load_into_store


class MemoryRecorder(SpanRecorder):
    def __init__(self) -> None:
        provider = build_tracer_provider([], max_queue_size=16)
        self.exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        super().__init__(provider)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Tests here configure logging like `run` and `audit` do; leave the global configuration as found."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def recorder() -> Iterator[MemoryRecorder]:
    rec = MemoryRecorder()
    yield rec
    rec.shutdown()


def span_lines(text: str) -> list[str]:
    """The trail's connection records: its lines without the checkpoint/policy records the writer adds."""
    return [line for line in text.splitlines() if '"recordType":' not in line]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


SHOP = Identity(
    namespace="shop",
    pod="web-7d9f",
    labels=MappingProxyType({"app": "web"}),
    namespace_labels=MappingProxyType({"kubernetes.io/metadata.name": "shop", "team": "payments"}),
)
PAYMENTS_POLICY = PolicyRef(kind="EgressPolicy", namespace="shop", name="payments", version="3")


def facts(target: str = "api.stripe.com", port: int = 443, **kwargs: object) -> Facts:
    values: dict[str, object] = {"identity": SHOP, "target": target, "port": port}
    values.update(kwargs)
    if isinstance(values.get("destination_ip"), str):
        values["destination_ip"] = ipaddress.ip_address(values["destination_ip"])  # type: ignore[arg-type]
    return Facts(**values)  # type: ignore[arg-type]


def allow(rule: str = "stripe", matched: str = "api.stripe.com") -> Decision:
    return Decision(
        allowed=True,
        reason=Reason.ALLOWED_BY_RULE,
        message=f"allowed by rule {rule}",
        policy=PAYMENTS_POLICY,
        rule=rule,
        matched=matched,
    )


def deny(reason: Reason = Reason.NO_MATCHING_RULE, message: str = "no rule allows this destination") -> Decision:
    return Decision(
        allowed=False, reason=reason, message=message, policy=PAYMENTS_POLICY if reason != Reason.NO_POLICY else None
    )


# ---- a realistic trail, decided by the real engine and written by the real recorder ---------------------------

SHOP_PAYMENTS_POLICY = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  rules:
    - {name: stripe-api, hosts: [api.stripe.com], ports: [443]}
    - {name: no-dashboard, action: Deny, hosts: [dashboard.stripe.com]}
"""
ANALYTICS_AUDIT_POLICY = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: onboarding, namespace: analytics}
spec:
  mode: Audit
  rules:
    - {name: google-apis, hosts: ["*.googleapis.com"], ports: [443]}
"""

PAYMENTS = Identity(
    namespace="shop",
    pod="payments-5c9d",
    labels=MappingProxyType({"app": "payments"}),
    namespace_labels=MappingProxyType({"kubernetes.io/metadata.name": "shop"}),
)
NOTEBOOK = Identity(
    namespace="analytics",
    pod="notebook-0",
    labels=MappingProxyType({"app": "notebook"}),
    namespace_labels=MappingProxyType({"kubernetes.io/metadata.name": "analytics"}),
)
ETL = Identity(
    namespace="analytics",
    pod="etl-1",
    labels=MappingProxyType({"app": "etl"}),
    namespace_labels=MappingProxyType({"kubernetes.io/metadata.name": "analytics"}),
)

# (identity, target, port, sni, resolved ip)
FLOWS: list[tuple[Identity | None, str, int, str | None, str | None]] = [
    (PAYMENTS, "api.stripe.com", 443, "api.stripe.com", "93.184.216.34"),
    (PAYMENTS, "api.stripe.com", 443, "api.stripe.com", "93.184.216.34"),
    (PAYMENTS, "api.stripe.com", 443, "api.stripe.com", "93.184.216.35"),
    (PAYMENTS, "dashboard.stripe.com", 443, None, None),
    (PAYMENTS, "evil.example.net", 443, None, None),
    (NOTEBOOK, "storage.googleapis.com", 443, "storage.googleapis.com", "93.184.216.40"),
    (NOTEBOOK, "bigquery.googleapis.com", 443, "bigquery.googleapis.com", "93.184.216.41"),
    (NOTEBOOK, "pypi.org", 443, "pypi.org", "93.184.216.42"),
    (ETL, "files.pythonhosted.org", 443, "files.pythonhosted.org", "93.184.216.43"),
    (ETL, "93.184.216.44", 8443, None, "93.184.216.44"),
    (None, "example.com", 443, None, None),
]


def write_policies(directory: Path, *texts: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        (directory / f"policy-{index}.yaml").write_text(text)
    return directory


def record_flows(trail: Path, policies: Path) -> list[Decision]:
    """Decide FLOWS with the real engine over `policies` and record them into `trail` like the proxy would."""
    store = PolicyStore()
    assert load_into_store([policies], store) == []
    engine = Engine(EngineConfig(default_allow=True), store.current)  # a rollout: default Allow, Audit previews
    recorder = build_recorder(Settings(audit=AuditSettings(file=trail)))
    decisions = []
    for index, (identity, target, port, sni, ip) in enumerate(FLOWS):
        record = recorder.open("CONNECT", f"127.0.0.{2 + index}", 40000 + index)
        destination = ipaddress.ip_address(ip) if ip else None
        decision = engine.decide(Facts(identity, target, port, sni=sni, destination_ip=destination))
        record.decided(Facts(identity, target, port, sni=sni, destination_ip=destination), decision)
        if decision.allowed:
            record.event("upstream_connected")
            record.set(egress_tls=sni is not None)
        record.close(bytes_sent=100 if decision.allowed else 0, bytes_received=1000 if decision.allowed else 0)
        decisions.append(decision)
    recorder.shutdown()
    return decisions
