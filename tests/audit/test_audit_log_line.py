"""The decision log line: one JSON object per decision, rendered by structlog as configured for `run`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from egress_gateway.audit.logs import DECISION_EVENT, decision_logger, log_decision
from egress_gateway.logging import configure_logging

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")
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
    "egress.tls_alpn": ["h2", "http/1.1"],
    "egress.tls_ech": False,
    "egress.decision": "allow",
    "egress.reason": "allowed_by_rule",
    "egress.message": "api.stripe.com:443 is allowed by rule 'stripe-api' of EgressPolicy/shop/payments",
    "egress.logged": False,
    "egress.would_deny": False,
    "egress.policy": "EgressPolicy/shop/payments",
    "egress.policy.version": "sha256:0494fe3bb5bb",
    "egress.rule": "stripe-api",
}


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _line(attributes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    configure_logging("info", "json")  # in the test: the JSON lines go to the stderr in place when configured
    capsys.readouterr()
    log_decision(decision_logger(), attributes, **IDS)
    err = capsys.readouterr().err
    assert err.endswith("}\n") and err.count("\n") == 1, err
    return err, json.loads(err)


def test_the_line_has_the_ids_every_attribute_the_event_level_and_time(capsys: pytest.CaptureFixture[str]) -> None:
    _, line = _line(ALLOWED, capsys)
    assert list(line)[:3] == ["trace_id", "span_id", "span_name"]
    assert list(line)[-3:] == ["event", "level", "timestamp"]
    assert line == {
        "trace_id": IDS["trace_id"],
        "span_id": IDS["span_id"],
        "span_name": "egress CONNECT",
        **ALLOWED,
        "event": DECISION_EVENT,
        "level": "info",
        "timestamp": line["timestamp"],
    }
    assert TIMESTAMP.match(line["timestamp"])


def test_odd_values_are_written_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    odd = {
        "server.address": 'xn--bcher-kva.example "quoted" \\ \u00e9\u2028\U0001f600\t\x00\x1b[31m',
        "egress.ratio": 0.1,
        "egress.big": 2**70,
        "egress.negative": -1.5e-7,
        "egress.empty": "",
        "egress.digest": "sha256:abc",
        "egress.basically": "basically fine",
    }
    raw, line = _line(odd, capsys)
    assert "\x00" not in raw and "\x1b" not in raw  # control characters are escaped by JSON
    assert line["server.address"] == odd["server.address"]
    assert line["egress.big"] == str(2**70)
    assert {key: line[key] for key in ("egress.ratio", "egress.negative", "egress.empty", "egress.digest")} == {
        "egress.ratio": 0.1,
        "egress.negative": -1.5e-7,
        "egress.empty": "",
        "egress.digest": "sha256:abc",
    }
    assert line["egress.basically"] == "basically fine"


def test_bytes_that_were_not_utf8_are_written_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    host = b"caf\xff\xfe.example".decode("utf-8", "surrogateescape")  # how mitmproxy hands over such a Host
    raw, line = _line({"egress.host_header": host, "egress.other": "\ud800"}, capsys)
    raw.encode("utf-8")  # valid UTF-8
    assert line["egress.host_header"] == "caf\\xff\\xfe.example"
    assert line["egress.other"] == "\\ud800"


def test_credentials_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    _, line = _line({**ALLOWED, "k8s.pod.label.api-token": "abc", "egress.host_header": "Bearer abc"}, capsys)
    assert line["k8s.pod.label.api-token"] == "[redacted]"
    assert line["egress.host_header"] == "[redacted]"


def test_context_variables_are_merged(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.contextvars.bind_contextvars(replica="a")
    _, line = _line(ALLOWED, capsys)
    assert line["replica"] == "a"
    structlog.contextvars.bind_contextvars(**{"egress.rule": "shadowed"})  # the line's own value wins
    assert _line(ALLOWED, capsys)[1]["egress.rule"] == "stripe-api"


def test_structlogs_own_capture_sees_the_event() -> None:
    with capture_logs() as captured:
        log_decision(decision_logger(), ALLOWED, **IDS)
    assert [entry["event"] for entry in captured] == [DECISION_EVENT]
    assert captured[0]["egress.rule"] == "stripe-api"


def test_console_format_and_warning_level_are_honoured(capsys: pytest.CaptureFixture[str]) -> None:
    logger = decision_logger()
    configure_logging("warning", "json")
    log_decision(logger, ALLOWED, **IDS)
    assert capsys.readouterr().err == ""
    configure_logging("info", "console")
    log_decision(logger, ALLOWED, **IDS)
    err = capsys.readouterr().err
    assert DECISION_EVENT in err and not err.startswith("{")
