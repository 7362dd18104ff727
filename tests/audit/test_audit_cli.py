"""The `audit` command over a trail written by the real recorder from real engine decisions."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from egress_gateway.cli import main
from egress_gateway.policy.validation import validate_object
from tests.audit.conftest import (
    ANALYTICS_AUDIT_POLICY,
    FLOWS,
    SHOP_PAYMENTS_POLICY,
    record_flows,
    span_lines,
    write_policies,
)


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trail")
    policies = write_policies(root / "policies", SHOP_PAYMENTS_POLICY, ANALYTICS_AUDIT_POLICY)
    path = root / "audit.jsonl"
    record_flows(path, policies)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["audit", *args])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[str]:
    return out.splitlines()[1:]


def test_lists_every_connection_as_a_table(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(trail))
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:5] == ["TIME", "NAMESPACE", "POD", "METHOD", "DESTINATION"]
    assert len(table_rows(out)) == len(FLOWS)
    assert any("dashboard.stripe.com:443" in row and "denied_by_rule" in row for row in table_rows(out))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--namespace", "shop"], 5),
        (["--namespace", "shop", "--decision", "deny"], 2),
        (["--decision", "allow"], 8),
        (["--reason", "unknown_client"], 1),
        (["--host", "*.STRIPE.com"], 4),
        (["--host", "*.googleapis.com", "--pod", "notebook-*"], 2),
        (["--would-deny"], 3),
        (["--policy", "payments"], 5),
        (["--policy", "EgressPolicy/analytics/onboarding"], 3),  # matches the would-deny policy too
        (["--rule", "stripe-api"], 3),
        (["--since", "1h"], len(FLOWS)),
        (["--until", "1h"], 0),
        (["--since", "2000-01-01T00:00:00Z", "--until", "2999-01-01"], len(FLOWS)),
    ],
)
def test_filters(trail: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: int) -> None:
    code, out, _ = run(capsys, str(trail), *args)
    assert code == 0
    assert len(table_rows(out)) == expected


def test_json_output_has_every_attribute(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(trail), "--output", "json", "--would-deny")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["egress.would_deny"] is True
        assert row["egress.would_deny.policy"] == "EgressPolicy/analytics/onboarding"
        assert len(row["trace_id"]) == 32


def test_csv_output_has_a_header_and_one_row_per_connection(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(trail), "--output", "csv", "--namespace", "shop")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 5
    assert {r["host"] for r in rows} == {"api.stripe.com", "dashboard.stripe.com", "evil.example.net"}
    assert rows[0]["policy"] == "EgressPolicy/shop/payments"


def test_reads_rotated_gzip_files_and_directories_oldest_first(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [line + "\n" for line in span_lines(trail.read_text())]
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    (rotated / "audit.jsonl.2.gz").write_bytes(gzip.compress("".join(lines[:3]).encode()))
    (rotated / "audit.jsonl.1").write_text("".join(lines[3:6]))
    (rotated / "audit.jsonl").write_text("".join(lines[6:]))
    code, out, _ = run(capsys, "--output", "json", str(rotated))
    assert code == 0
    got = [json.loads(line)["trace_id"] for line in out.splitlines()]
    assert got == [json.loads(line)["traceId"] for line in lines]


def test_reads_stdin_even_gzipped(trail: Path) -> None:
    data = gzip.compress(trail.read_bytes())
    result = subprocess.run(
        [sys.executable, "-m", "egress_gateway", "audit", "--summary", "--output", "json"],
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0] == {**rows[0], "namespace": "shop", "destination": "api.stripe.com:443", "count": 3}


def test_bad_lines_are_reported_and_skipped(trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("not json\n" + trail.read_text() + '{"hello": 1}\n')
    code, out, err = run(capsys, str(mixed))
    assert code == 0
    assert len(table_rows(out)) == len(FLOWS)
    assert "skipped 2 line(s)" in err and "mixed.jsonl:1" in err


def test_summary_counts_by_namespace_destination_and_decision(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(trail), "--summary", "--top", "3")
    assert code == 0
    rows = table_rows(out)
    assert len(rows) == 3
    assert rows[0].split()[:4] == ["3", "shop", "api.stripe.com:443", "allow"]


def test_suggest_policy_allows_exactly_what_was_seen_and_passes_lint(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(trail), "--suggest-policy", "analytics")
    assert code == 0
    policies = [p for p in yaml.safe_load_all(out) if p]
    for policy in policies:
        validate_object(policy)
    # one policy per workload selector (the pods' `app` label)
    by_name = {p["metadata"]["name"]: p for p in policies}
    assert set(by_name) == {"analytics-observed-etl", "analytics-observed-notebook"}
    etl, notebook = by_name["analytics-observed-etl"], by_name["analytics-observed-notebook"]
    assert etl["metadata"]["namespace"] == "analytics"
    assert etl["spec"]["podSelector"] == {"matchLabels": {"app": "etl"}}
    assert notebook["spec"]["rules"] == [
        {"name": "seen-443", "hosts": ["bigquery.googleapis.com", "pypi.org", "storage.googleapis.com"], "ports": [443]}
    ]
    rules = {r["name"]: r for r in etl["spec"]["rules"]}
    assert rules["seen-443"]["hosts"] == ["files.pythonhosted.org"]
    assert rules["seen-ips-8443"] == {"name": "seen-ips-8443", "cidrs": ["93.184.216.44/32"], "ports": [8443]}
    suggested = tmp_path / "suggested.yaml"
    suggested.write_text(out)
    assert main(["lint", str(suggested)]) == 0


def test_suggest_policy_collapses_only_when_asked_and_selects_pods(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, str(trail), "--suggest-policy", "analytics", "--pod-label", "app=notebook", "--collapse")
    assert code == 0
    policy = yaml.safe_load(out)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "notebook"}}
    assert policy["spec"]["rules"] == [{"name": "seen-443", "hosts": ["*.googleapis.com", "pypi.org"], "ports": [443]}]


def test_suggest_policy_with_nothing_seen_says_so(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, str(trail), "--suggest-policy", "billing")
    assert code == 1 and out == ""
    assert "no allowed connections of namespace 'billing'" in err


def test_replay_under_the_policies_in_force_changes_nothing(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(trail), "--replay", str(trail.parent / "policies"), "--default-action", "Allow")
    assert code == 0
    assert f"replayed {len(FLOWS)} connection(s)" in out
    assert "allow -> deny: 0" in out and "deny -> allow: 0" in out


def test_replay_gates_on_allowed_flows_the_candidate_would_deny(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Candidate: enforce on analytics with only the Google APIs, and let shop reach evil.example.net.
    enforce = ANALYTICS_AUDIT_POLICY.replace("mode: Audit", "mode: Enforce")
    shop = SHOP_PAYMENTS_POLICY.replace("hosts: [api.stripe.com]", "hosts: [api.stripe.com, evil.example.net]")
    candidate = write_policies(tmp_path / "candidate", shop, enforce)
    code, out, _ = run(capsys, str(trail), "--replay", str(candidate), "--default-action", "Allow", "--output", "json")
    assert code == 1
    report = json.loads(out)
    assert report["allow_to_deny"] == 3
    assert report["deny_to_allow"] == 1
    flips = {(f["change"], f["destination"]): f for f in report["flips"]}
    assert set(flips) == {
        ("allow -> deny", "pypi.org:443"),
        ("allow -> deny", "files.pythonhosted.org:443"),
        ("allow -> deny", "93.184.216.44:8443"),
        ("deny -> allow", "evil.example.net:443"),
    }
    assert flips[("deny -> allow", "evil.example.net:443")]["after"].startswith("allow allowed_by_rule")


def test_replay_after_suggest_is_clean(trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(trail), "--suggest-policy", "analytics")
    assert code == 0
    candidate = write_policies(tmp_path / "candidate", SHOP_PAYMENTS_POLICY, out)
    code, out, _ = run(capsys, str(trail), "--replay", str(candidate), "--default-action", "Allow")
    assert code == 0, out
    assert "allow -> deny: 0" in out


def test_replay_rejects_invalid_candidate_policies(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = write_policies(tmp_path / "broken", SHOP_PAYMENTS_POLICY.replace("ports: [443]", "ports: [70000]"))
    code, out, err = run(capsys, str(trail), "--replay", str(broken))
    assert code == 2 and out == ""
    assert "invalid policy" in err and "70000" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "is not a time"),
        (["--replay", "/nonexistent/policies"], "no such file or directory"),
        (["--suggest-policy", "shop", "--namespace", "analytics"], "different namespaces"),
    ],
)
def test_bad_input_is_a_clear_usage_error(
    trail: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, str(trail), *args)
    assert code == 2 and out == ""
    assert message in err


def test_missing_trail_file_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "/nonexistent/audit.jsonl")
    assert code == 2 and "no such file" in err


def test_open_records_join_their_close_and_unclosed_ones_are_listed(
    trail: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spans = [json.loads(line) for line in span_lines(trail.read_text())]

    def opened(span: dict[str, Any]) -> str:
        fields = {"recordType": "open", "traceId": span["traceId"], "spanId": span["spanId"], "name": span["name"]}
        return json.dumps({**fields, "timeUnixNano": span["startTimeUnixNano"], "attributes": span["attributes"]})

    # Every connection's open record, then the close records of all but the last two (the gateway died).
    lines = [opened(span) for span in spans] + [json.dumps(span) for span in spans[:-2]]
    killed = tmp_path / "killed.jsonl"
    killed.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, str(killed), "--output", "json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["trace_id"] for r in rows] == [s["traceId"] for s in spans]  # each connection once
    assert [r.get("never_closed", False) for r in rows] == [False] * (len(spans) - 2) + [True, True]
    code, out, _ = run(capsys, str(killed), "--open")
    assert code == 0 and len(out.splitlines()) == 3  # header + the two
    assert "(open)" in out


def test_idn_names_are_recorded_as_a_labels_with_a_unicode_display_form_and_found_by_either(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from egress_gateway.audit import build_recorder
    from egress_gateway.settings import AuditSettings, Settings
    from tests.audit.conftest import allow, facts

    trail = tmp_path / "audit.jsonl"
    recorder = build_recorder(Settings(audit=AuditSettings(file=trail)))
    for name in ("bücher.example", "xn--bcher-kva.example", "plain.example"):
        record = recorder.open("CONNECT", "127.0.0.2", 40000)
        record.decided(facts(name, sni=name), allow())
        record.close()
    recorder.shutdown()
    capsys.readouterr()  # the recorder's own log lines
    assert main(["audit", "--output", "json", str(trail)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["server.address"] for r in rows] == ["xn--bcher-kva.example", "xn--bcher-kva.example", "plain.example"]
    assert [r.get("egress.server.address.unicode") for r in rows] == ["bücher.example", "bücher.example", None]
    assert [r.get("egress.tls.server_name.unicode") for r in rows] == ["bücher.example", "bücher.example", None]
    for pattern in ("xn--bcher*", "BÜCHER.*"):
        assert main(["audit", "--output", "json", "--host", pattern, str(trail)]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2
