"""The decision log line rendered directly is byte for byte what the configured structlog chain writes."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from egress_gateway.audit import logs
from egress_gateway.audit.logs import DECISION_EVENT, configure_logging, log_decision

TIMESTAMP = re.compile(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')
IDS = {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7", "name": "egress CONNECT"}

ALLOWED: dict[str, Any] = {
    "client.address": "10.244.1.17",
    "client.port": 40312,
    "http.request.method": "CONNECT",
    "server.address": "api.stripe.com",
    "server.port": 443,
    "network.peer.address": "93.184.216.34",
    "k8s.namespace.name": "shop",
    "k8s.pod.name": "payments-7d9f",
    "k8s.pod.label.app": "payments",
    "k8s.namespace.label.kubernetes.io/metadata.name": "shop",
    "egress.tls": True,
    "tls.client.server_name": "api.stripe.com",
    "egress.tls_alpn": "h2,http/1.1",
    "egress.decision": "allow",
    "egress.reason": "allowed_by_rule",
    "egress.message": "api.stripe.com:443 is allowed by rule 'stripe-api' of EgressPolicy/shop/payments",
    "egress.logged": False,
    "egress.would_deny": False,
    "egress.policy": "EgressPolicy/shop/payments",
    "egress.policy.version": "sha256:0494fe3bb5bb",
    "egress.rule": "stripe-api",
}
ODD_VALUES: dict[str, Any] = {
    "server.address": 'xn--bcher-kva.example "quoted" \\ \u00e9\u2028\U0001f600\t',
    "egress.ratio": 0.1,
    "egress.big": 2**70,
    "egress.negative": -1.5e-7,
    "egress.nan": float("nan"),
    "egress.inf": float("-inf"),
    "egress.empty": "",
    "egress.digest": "sha256:abc",
    "egress.basically": "basically fine",
}
REDACTED_ONES: dict[str, Any] = {
    **ALLOWED,
    "k8s.pod.label.api-token": "abc",  # a credential-looking label key
    "egress.host_header": "Bearer abc",  # a credential-looking value
}


@pytest.fixture(autouse=True)
def _json_info_logging() -> Iterator[None]:
    configure_logging("info", "json")
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _through_structlog(attributes: dict[str, Any]) -> None:
    """What `log_decision` wrote before it rendered the line itself."""
    fields = {"trace_id": IDS["trace_id"], "span_id": IDS["span_id"], "span_name": IDS["name"], **attributes}
    structlog.get_logger("egress_gateway.audit").info(DECISION_EVENT, **fields)


def _both(attributes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    capsys.readouterr()
    log_decision(attributes, **IDS)
    direct = capsys.readouterr().err
    _through_structlog(attributes)
    reference = capsys.readouterr().err
    assert TIMESTAMP.search(direct), direct
    return TIMESTAMP.sub("T", direct), TIMESTAMP.sub("T", reference)


@pytest.mark.parametrize(
    "attributes", [ALLOWED, ODD_VALUES, REDACTED_ONES, {}], ids=["allowed", "odd", "redacted", "empty"]
)
def test_the_line_is_byte_for_byte_what_the_structlog_chain_writes(
    attributes: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    direct, reference = _both(attributes, capsys)
    assert direct == reference
    assert direct.endswith("}\n") and direct.count("\n") == 1


def test_context_variables_are_merged_like_the_chain_does(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.contextvars.bind_contextvars(worker=1)
    direct, reference = _both(ALLOWED, capsys)
    assert direct == reference
    assert '"event": "egress_decision", "worker": 1, "level": "info"' in direct
    structlog.contextvars.bind_contextvars(**{"egress.rule": "shadowed"})  # an existing key keeps its value
    assert _both(ALLOWED, capsys)[0] == _both(ALLOWED, capsys)[1]


def test_the_common_line_does_not_go_through_a_bound_logger(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(logs, "_decision_log", None)  # any use of it would raise
    log_decision(ALLOWED, **IDS)
    assert '"egress.rule": "stripe-api"' in capsys.readouterr().err


def test_another_configuration_gets_the_event_through_structlog() -> None:
    with capture_logs() as captured:
        log_decision(ALLOWED, **IDS)
    assert [entry["event"] for entry in captured] == [DECISION_EVENT]
    assert captured[0]["egress.rule"] == "stripe-api"
    structlog.reset_defaults()
    with capture_logs() as captured:
        log_decision(ALLOWED, **IDS)
    assert len(captured) == 1


def test_console_format_and_warning_level_are_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    log_decision(ALLOWED, **IDS)
    assert capsys.readouterr().err == ""
    configure_logging("info", "console")
    log_decision(ALLOWED, **IDS)
    err = capsys.readouterr().err
    assert DECISION_EVENT in err and not err.startswith("{")


@pytest.mark.parametrize(
    "nanoseconds",
    [1_764_165_841_258_134_999, 1_764_165_841_000_000_000, 1_764_165_841_000_000_999, 1_764_165_899_999_999_999, 0],
)
def test_the_timestamp_is_the_time_stampers_format(monkeypatch: pytest.MonkeyPatch, nanoseconds: int) -> None:
    monkeypatch.setattr(logs.time, "time_ns", lambda: nanoseconds)
    expected = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(microseconds=nanoseconds // 1000)
    assert logs._timestamp() == expected.isoformat().replace("+00:00", "Z")


def test_the_timestamp_reads_the_same_clock_as_the_time_stamper() -> None:
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    before = stamper(None, "info", {})["timestamp"]
    ours = logs._timestamp()
    after = stamper(None, "info", {})["timestamp"]
    parse = datetime.datetime.fromisoformat
    assert parse(before) <= parse(ours) <= parse(after)
