"""The PrometheusRule and the Grafana dashboard: their PromQL parses (promql-parser, the Rust PromQL parser), and
every metric they query is one a real gateway exports on /metrics, with label values the gateway really writes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from egress_gateway.policy.decision import Reason
from tests.chart.conftest import ALL_FEATURES, NAMESPACE, RELEASE, Helm, one
from tests.support.gateway import GatewayProcess

promql_parser = pytest.importorskip("promql_parser", reason="promql-parser is in the test extras")

FULLNAME = f"{RELEASE}-egress-gateway"
ON_CALL_ALERTS = {
    "EgressGatewayNotReady",
    "EgressGatewayPolicySourceStale",
    "EgressGatewayAuditExportDrops",
    "EgressGatewayDenySpike",
    "EgressGatewayConnectionLimitReached",
}
MADE_BY_PROMETHEUS = {"up"}
# Label values the queries filter on, and the values the gateway writes for them.
KNOWN_LABEL_VALUES = {
    "decision": {"allow", "deny"},
    "reason": {reason.value for reason in Reason},
}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Series names a real gateway exports: families from /metrics with their type's suffixes (a labelled metric
    without samples yet still has its HELP/TYPE lines)."""
    workdir = tmp_path_factory.mktemp("monitoring")
    config = {"identity": {"mode": ["static"], "static": [{"cidr": "127.0.0.0/8", "namespace": "shop"}]}}
    gateway = GatewayProcess(workdir / "gw", config, {}).start(timeout=60)
    try:
        # One denied request, so the decision counter has a sample with real label values too.
        proxy = urllib.request.ProxyHandler({"http": gateway.proxy_url})
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.build_opener(proxy).open("http://denied.example.test/", timeout=10)
        assert denied.value.code == 403
        with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        assert gateway.stop() == 0
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    assert 'decision="deny"' in text
    yield names


def _selectors(node: Any) -> Iterator[Any]:
    """Every VectorSelector in a parsed expression."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attribute in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from _selectors(child)
    for arg in getattr(node, "args", None) or ():
        yield from _selectors(arg)


def _check_queries(queries: dict[str, str], exported: set[str]) -> None:
    for where, query in queries.items():
        parsed = promql_parser.parse(query)  # raises on a syntax error
        selectors = list(_selectors(parsed))
        assert selectors, f"{where}: no metric in {query}"
        for selector in selectors:
            assert selector.name in exported | MADE_BY_PROMETHEUS, f"{where}: {selector.name} is not exported"
            for matcher in selector.matchers.matchers:
                known = KNOWN_LABEL_VALUES.get(matcher.name)
                if known is not None and matcher.op == promql_parser.MatchOp.Equal:
                    assert matcher.value in known, f"{where}: {matcher.name}={matcher.value!r} is never written"


@pytest.fixture(scope="module")
def rules(helm3: Helm) -> list[dict[str, Any]]:
    rule = one(helm3.objects(ALL_FEATURES), "PrometheusRule")
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    found: list[dict[str, Any]] = group["rules"]
    return found


def test_the_on_call_alerts_are_there(rules: list[dict[str, Any]]) -> None:
    assert {rule["alert"] for rule in rules} == ON_CALL_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["for"].endswith("m")


def test_alert_queries_parse_and_use_exported_metrics(rules: list[dict[str, Any]], exported_metrics: set[str]) -> None:
    _check_queries({rule["alert"]: rule["expr"] for rule in rules}, exported_metrics)


def test_alerts_select_this_release_and_the_client_namespace_label(rules: list[dict[str, Any]]) -> None:
    for rule in rules:
        for selector in _selectors(promql_parser.parse(rule["expr"])):
            matchers = {m.name: m.value for m in selector.matchers.matchers}
            assert matchers["job"] == f"{FULLNAME}-metrics" and matchers["namespace"] == NAMESPACE
    spike = next(rule for rule in rules if rule["alert"] == "EgressGatewayDenySpike")
    assert "sum by (exported_namespace)" in spike["expr"]
    assert "$labels.exported_namespace" in spike["annotations"]["summary"]


def test_invalid_promql_is_caught() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (namespace (rate(egress_gateway_decisions_total[5m]))")


def test_dashboard_is_a_sidecar_config_map_with_queries_on_exported_metrics(
    helm3: Helm, exported_metrics: set[str]
) -> None:
    config_map = one(helm3.objects(ALL_FEATURES), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    dashboard = json.loads(config_map["data"]["egress-gateway.json"])
    assert dashboard["uid"] == "egress-gateway"
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Grafana's variables, as Grafana substitutes them, so that the parser sees PromQL.
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$job", "j").replace("$namespace", "n")
            queries[f"{panel['title']} {target['refId']}"] = expr
    assert len(queries) >= 10
    _check_queries(queries, exported_metrics)
    assert "CLIENT_NAMESPACE_LABEL" not in config_map["data"]["egress-gateway.json"]
    assert "exported_namespace" in config_map["data"]["egress-gateway.json"]


def test_monitoring_objects_are_off_by_default(default_objects: list[dict[str, Any]]) -> None:
    assert not [o for o in default_objects if o["kind"] == "PrometheusRule"]
    assert not [o for o in default_objects if o["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_file_is_valid_json() -> None:
    from tests.chart.conftest import CHART

    path: Path = CHART / "dashboards" / "egress-gateway.json"
    assert json.loads(path.read_text())["title"] == "Egress gateway"
    assert yaml.safe_load(path.read_text())  # JSON is YAML: the ConfigMap block scalar carries it as is
