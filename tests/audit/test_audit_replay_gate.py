"""`audit --replay` as a two-way CI gate: both directions reported apart with pod columns, an --expect gate file,
--fail-on, and candidate rules no recorded connection exercises. Real trail (real engine, real recorder), real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egress_gateway.cli import main
from tests.audit.conftest import ANALYTICS_AUDIT_POLICY, SHOP_PAYMENTS_POLICY, record_flows, write_policies

# Candidate: enforce analytics with only the Google APIs (closes pypi.org for the notebook, files.pythonhosted.org
# and 93.184.216.44:8443 for etl), let shop reach evil.example.net (opens it), and add a broad rule nothing used.
ENFORCE = ANALYTICS_AUDIT_POLICY.replace("mode: Audit", "mode: Enforce")
SHOP = SHOP_PAYMENTS_POLICY.replace("hosts: [api.stripe.com]", "hosts: [api.stripe.com, evil.example.net]") + (
    '    - {name: partner-apis, hosts: ["**.partner.example.org"], ports: [443]}\n'
)
CLOSED_FOR_ANALYTICS = """\
# intended: analytics loses what the onboarding policy does not list
- {change: closed, namespace: analytics, pod: "notebook-*", destination: "pypi.org:443", why: "use the mirror"}
- {change: closed, namespace: analytics, pod: "etl-*"}
"""


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    path = root / "audit.jsonl"
    record_flows(path, write_policies(root / "policies", SHOP_PAYMENTS_POLICY, ANALYTICS_AUDIT_POLICY))
    write_policies(root / "candidate", SHOP, ENFORCE)
    return path


def replay(capsys: pytest.CaptureFixture[str], trail: Path, *args: str) -> tuple[int, str, str]:
    code = main(["audit", str(trail), "--replay", str(trail.parent / "candidate"), "--default-action", "Allow", *args])
    out, err = capsys.readouterr()
    return code, out, err


def expect_file(trail: Path, text: str, name: str = "expect.yaml") -> str:
    path = trail.parent / name
    path.write_text(text)
    return str(path)


def test_both_directions_are_reported_apart_with_namespace_and_pod(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = replay(capsys, trail)
    assert code == 1
    assert "allow -> deny: 3 (0 expected)   deny -> allow: 1 (0 expected)" in out
    closes = out.index("allow -> deny: access the candidate closes")
    opens = out.index("deny -> allow: access the candidate opens")
    assert closes < opens
    closed_part, opened_part = out[closes:opens], out[opens:]
    assert "NAMESPACE  POD" in closed_part
    assert "analytics  notebook-0  pypi.org:443" in closed_part
    assert "analytics  etl-1" in closed_part and "files.pythonhosted.org:443" in closed_part
    assert "shop       payments-5c9d  evil.example.net:443" in opened_part
    assert "evil.example.net" not in closed_part
    assert "result: FAIL (--fail-on any; unexpected changes: closed 3, opened 1)" in out


def test_opening_access_fails_the_gate_by_default(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deny -> allow is a change too: with every tightening expected, the one opening still fails."""
    expect = expect_file(trail, CLOSED_FOR_ANALYTICS)
    code, out, _ = replay(capsys, trail, "--expect", expect)
    assert code == 1
    assert "allow -> deny: 3 (3 expected)   deny -> allow: 1 (0 expected)" in out
    assert "result: FAIL (--fail-on any; unexpected changes: closed 0, opened 1)" in out


def test_fail_on_chooses_the_direction(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect = expect_file(trail, CLOSED_FOR_ANALYTICS)
    assert replay(capsys, trail, "--expect", expect, "--fail-on", "closed")[0] == 0
    assert replay(capsys, trail, "--expect", expect, "--fail-on", "opened")[0] == 1
    assert replay(capsys, trail, "--fail-on", "opened")[0] == 1
    assert replay(capsys, trail, "--fail-on", "closed")[0] == 1


def test_an_expect_file_naming_every_change_passes(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = CLOSED_FOR_ANALYTICS + '- {change: opened, namespace: shop, destination: "evil.example.net:*"}\n'
    code, out, _ = replay(capsys, trail, "--expect", expect_file(trail, text), "--output", "json")
    assert code == 0
    report = json.loads(out)
    assert report["failed"] is False and report["unexpected_closed"] == 0 and report["unexpected_opened"] == 0
    assert all(flip["expected"] for flip in report["flips"])
    assert {flip["pod"] for flip in report["flips"]} == {"notebook-0", "etl-1", "payments-5c9d"}


def test_an_expectation_in_the_wrong_direction_does_not_cover(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = '- {change: opened, namespace: analytics, destination: "pypi.org:443"}\n'
    code, out, _ = replay(capsys, trail, "--expect", expect_file(trail, text), "--fail-on", "closed")
    assert code == 1
    assert "expected changes that did not happen" in out
    assert "  - opened namespace=analytics destination=pypi.org:443" in out


def test_rules_no_recorded_connection_matches_are_untested_by_the_trail(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = replay(capsys, trail)
    untested = out[out.index("untested by the trail") :]
    assert "EgressPolicy/shop/payments Allow rule partner-apis: **.partner.example.org on 443" in untested
    assert "rule stripe-api" not in untested  # payments used it
    _, out, _ = replay(capsys, trail, "--output", "json")
    rules = {(u["policy"], u["rule"]) for u in json.loads(out)["untested_rules"]}
    assert ("EgressPolicy/shop/payments", "partner-apis") in rules
    assert ("EgressPolicy/shop/payments", "no-dashboard") not in rules  # dashboard.stripe.com was recorded


@pytest.mark.parametrize(
    "text, message",
    [
        ("- {change: widened}\n", "`change` must be closed or opened"),
        ("- {change: closed, namspace: analytics}\n", "unknown field(s) namspace"),
        ("- [unclosed\n", "while parsing"),
    ],
)
def test_a_bad_expect_file_is_a_usage_error(
    trail: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    code, out, err = replay(capsys, trail, "--expect", expect_file(trail, text, "bad.yaml"))
    assert code == 2 and out == ""
    assert message in err
