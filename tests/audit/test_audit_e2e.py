"""End to end: a real gateway subprocess, real curl clients on loopback "pods", a real TLS origin; the trail file it
writes is read back by the `audit` command, its spans reach a real OTLP receiver (rotel), and /metrics is scraped.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.audit.conftest import span_lines
from tests.proxy.conftest import ANALYTICS_POD, PAYMENTS_POD, UNKNOWN_POD, curl
from tests.support.gateway import REPO, GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

ORIGIN_IP = "127.0.0.5"
SECRET = "s3cr3t-proxy-password"
STRIPE = "api.stripe.test"
HOSTS = {STRIPE: [ORIGIN_IP], "dashboard.stripe.test": [ORIGIN_IP], "pypi.test": [ORIGIN_IP], "x.gcs.test": [ORIGIN_IP]}
IDENTITIES = [
    {"cidr": f"{PAYMENTS_POD}/32", "namespace": "shop", "pod": "payments-1", "labels": {"app": "payments"}},
    {"cidr": f"{ANALYTICS_POD}/32", "namespace": "analytics", "pod": "reports-1", "labels": {"app": "reports"}},
]


def _policies(port: int) -> dict[str, str]:
    return {
        "shop.yaml": f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: payments, namespace: shop}}
spec:
  rules:
    - {{name: stripe-api, hosts: [{STRIPE}], ports: [{port}]}}
    - {{name: no-dashboard, action: Deny, hosts: [dashboard.stripe.test]}}
""",
        "analytics.yaml": f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: onboarding, namespace: analytics}}
spec:
  mode: Audit
  rules:
    - {{name: gcs, hosts: ["*.gcs.test"], ports: [{port}]}}
""",
    }


def _config(**audit: Any) -> dict[str, Any]:
    return {
        "default_action": "Allow",  # a rollout in progress: Audit-mode policies preview their denials
        "identity": {"mode": ["static"], "static": IDENTITIES},
        "resolver": {"hosts": HOSTS},
        "allowed_ranges": ["127.0.0.0/8"],  # the test origins live on loopback
        "audit": audit,
    }


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def origin(ca: TestCA) -> Iterator[OriginServer]:
    server = OriginServer(ORIGIN_IP, ca.issue(*HOSTS).server_context(), "origin").start()
    yield server
    server.stop()


def _audit(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egress_gateway", "audit", *args],
        cwd=REPO,
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _metrics(gateway: GatewayProcess) -> str:
    with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _poll(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, origin: OriginServer) -> dict[str, Any]:
    """One gateway run with allowed, denied, would-deny and unknown-client traffic; returns what it left behind."""
    workdir = tmp_path_factory.mktemp("e2e")
    trail = workdir / "audit.jsonl"
    gateway = GatewayProcess(workdir / "gw", _config(file=str(trail)), _policies(origin.port))
    gateway.start(extra_env={"OTEL_BSP_SCHEDULE_DELAY": "200"})
    port = origin.port
    try:
        results = {
            "allowed": [curl(gateway, f"https://{STRIPE}:{port}/v1/charges", ca=ca) for _ in range(3)],
            "denied_rule": curl(gateway, f"https://dashboard.stripe.test:{port}/", ca=ca),
            "denied_no_match": curl(gateway, f"https://x.gcs.test:{port}/", ca=ca),
            "would_deny": curl(gateway, f"https://pypi.test:{port}/simple/", ca=ca, source=ANALYTICS_POD),
            "audit_allowed": curl(gateway, f"https://x.gcs.test:{port}/bucket", ca=ca, source=ANALYTICS_POD),
            "unknown": curl(gateway, f"https://{STRIPE}:{port}/", ca=ca, source=UNKNOWN_POD),
            # Credentials sent to the proxy must never reach the trail or the logs.
            "with_credentials": curl(
                gateway, f"https://{STRIPE}:{port}/v1/refunds", "--proxy-user", f"ci:{SECRET}", ca=ca
            ),
        }
        _poll(lambda: _sample(_metrics(gateway), "egress_gateway_active_tunnels") == 0, 10, "tunnels to close")
        metrics = _metrics(gateway)
    finally:
        code = gateway.stop()
    assert code == 0
    return {"trail": trail, "results": results, "metrics": metrics, "gateway": gateway, "workdir": workdir}


def test_traffic_went_as_the_policies_say(recorded: dict[str, Any]) -> None:
    results = recorded["results"]
    assert all(r.status == 200 for r in results["allowed"])
    assert results["denied_rule"].connect_status == 403
    assert results["denied_no_match"].connect_status == 403
    assert results["would_deny"].status == 200  # Audit mode changes nothing
    assert results["audit_allowed"].status == 200
    assert results["unknown"].connect_status in (403, 407)
    assert results["with_credentials"].status == 200


def test_trail_file_has_one_span_per_connection_and_matches_the_log_lines(recorded: dict[str, Any]) -> None:
    text = recorded["trail"].read_text()
    lines = [json.loads(line) for line in span_lines(text)]
    assert len(lines) == 9
    assert {s["name"] for s in lines} == {"egress CONNECT"}
    denied = [s for s in lines if s.get("status", {}).get("code") == 2]
    assert len(denied) == 3
    logged = recorded["gateway"].find("egress_decision")
    assert {line["trace_id"] for line in logged} == {s["traceId"] for s in lines}
    encoded = base64.b64encode(f"ci:{SECRET}".encode()).decode()
    everything = text + "\n".join(recorded["gateway"].stderr_lines + recorded["gateway"].stdout_lines)
    assert SECRET not in everything and encoded not in everything


def test_audit_lists_and_filters_the_real_trail(recorded: dict[str, Any]) -> None:
    trail = str(recorded["trail"])
    done = _audit(trail, "--namespace", "shop", "--decision", "deny", "--output", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert {(r["host"], r["reason"]) for r in rows} == {
        ("dashboard.stripe.test", "denied_by_rule"),
        ("x.gcs.test", "no_matching_rule"),
    }
    assert all(r["pod"] == "payments-1" and r["peer"] in ("", ORIGIN_IP) for r in rows)

    done = _audit(trail, "--would-deny")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()[1:]
    assert "analytics" in line and "pypi.test" in line

    done = _audit(trail, "--host", "*.STRIPE.test", "--since", "1h", "--output", "json")
    spans = [json.loads(text) for text in done.stdout.splitlines()]
    assert len(spans) == 6  # 4 allowed, the dashboard denial, and the unknown client's attempt
    allowed = [span for span in spans if span["egress.decision"] == "allow"]
    assert len(allowed) == 4
    for span in allowed:
        assert span["tls.client.server_name"] == STRIPE
        assert span["network.peer.address"] == ORIGIN_IP
        assert span["egress.rule"] == "stripe-api"
        assert span["egress.bytes_received"] > 0

    done = _audit(trail, "--reason", "unknown_client")
    assert len(done.stdout.splitlines()) == 2


def test_the_real_gateways_trail_verifies_and_an_edit_is_found(recorded: dict[str, Any], tmp_path: Path) -> None:
    done = _audit("verify", str(recorded["trail"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "intact" in done.stdout and "final checkpoint" not in done.stdout  # the gateway stopped cleanly
    lines = recorded["trail"].read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"deny"', b'"allow"', 1) if b'"deny"' in lines[3] else lines[3].replace(b"4", b"5", 1)
    edited = tmp_path / "audit.jsonl"
    edited.write_bytes(b"".join(lines))
    done = _audit("verify", str(edited))
    assert done.returncode == 1 and f"{edited}:4: " in done.stdout and "edited" in done.stdout


def test_audit_summary_of_the_real_trail(recorded: dict[str, Any]) -> None:
    done = _audit(str(recorded["trail"]), "--summary", "--output", "json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    top = rows[0]
    assert (top["namespace"], top["decision"], top["count"]) == ("shop", "allow", 4)
    assert top["destination"].startswith(f"{STRIPE}:")


def test_suggest_then_replay_then_gate(recorded: dict[str, Any], tmp_path: Path) -> None:
    trail = str(recorded["trail"])
    config = str(recorded["gateway"].config_path)
    policies_dir = recorded["gateway"].policies_dir

    # Replaying under the policies in force (and the same gateway config) changes nothing.
    done = _audit(trail, "--replay", str(policies_dir), "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "allow -> deny: 0" in done.stdout and "deny -> allow: 0" in done.stdout

    # Learn what analytics uses, and replay the suggestion in Enforce mode: nothing it used would break.
    done = _audit(trail, "--suggest-policy", "analytics", "--name", "onboarding")
    assert done.returncode == 0, done.stderr
    suggested = yaml.safe_load(done.stdout)
    hosts = sorted(h for rule in suggested["spec"]["rules"] for h in rule.get("hosts", []))
    assert hosts == ["pypi.test", "x.gcs.test"]
    candidate = tmp_path / "candidate"
    shutil.copytree(policies_dir, candidate)
    (candidate / "analytics.yaml").write_text(done.stdout)
    lint = subprocess.run(
        [sys.executable, "-m", "egress_gateway", "lint", str(candidate)], capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    done = _audit(trail, "--replay", str(candidate), "--config", config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "allow -> deny: 0" in done.stdout

    # Enforcing the original Audit policy instead would break pypi.test: the gate fails.
    strict = tmp_path / "strict"
    shutil.copytree(policies_dir, strict)
    text = (strict / "analytics.yaml").read_text().replace("mode: Audit", "mode: Enforce")
    (strict / "analytics.yaml").write_text(text)
    done = _audit(trail, "--replay", str(strict), "--config", config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "allow -> deny: 1" in done.stdout
    assert re.search(
        r"allow -> deny: access the candidate closes\n.*\n1\s+analytics\s+reports-1\s+pypi\.test:\d+", done.stdout
    ), done.stdout


def test_metrics_scraped_after_traffic_show_the_expected_counters(recorded: dict[str, Any]) -> None:
    text = recorded["metrics"]
    assert _sample(text, "egress_gateway_decisions_total", namespace="shop", decision="allow") >= 3
    assert _sample(text, "egress_gateway_decisions_total", namespace="shop", reason="denied_by_rule") == 1
    assert _sample(text, "egress_gateway_decisions_total", namespace="shop", reason="no_matching_rule") == 1
    assert _sample(text, "egress_gateway_would_deny_total", namespace="analytics", reason="no_matching_rule") >= 1
    assert _sample(text, "egress_gateway_decisions_total", namespace="_unknown", decision="deny") >= 1
    assert _sample(text, "egress_gateway_bytes_total", namespace="shop", direction="received") > 0
    assert _sample(text, "egress_gateway_bytes_total", namespace="shop", direction="sent") > 0
    assert _sample(text, "egress_gateway_active_tunnels") == 0
    assert _sample(text, "egress_gateway_decision_duration_seconds_count") >= 9
    # Bounded labels: no host, pod or address ever appears in a label.
    for line in text.splitlines():
        if line.startswith("egress_gateway_"):
            assert "stripe" not in line and "payments-1" not in line and "127.0.0" not in line, line


# ---- a real OTLP receiver ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rotel_binary() -> Path:
    try:
        import rotel
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("rotel is not installed (pip install -e '.[test]')")
    return Path(rotel.__file__).parent / "rotel-agent"


class Rotel:
    """rotel (a Rust OpenTelemetry collector from PyPI) as a local OTLP receiver that prints what it receives."""

    def __init__(self, workdir: Path, *, http_port: int | None = None) -> None:
        self.grpc_port = _free_port()
        self.http_port = http_port or _free_port()
        self.output = workdir / "rotel.out"
        env = dict(os.environ)
        # The agent links libpython; point the loader at this interpreter's library directory.
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        self._out = self.output.open("wb")
        self.process = subprocess.Popen(
            [
                str(_rotel_binary()),
                "start",
                "--otlp-grpc-endpoint",
                f"127.0.0.1:{self.grpc_port}",
                "--otlp-http-endpoint",
                f"127.0.0.1:{self.http_port}",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--pid-file",
                str(workdir / "rotel.pid"),
                "--log-file",
                str(workdir / "rotel.log"),
            ],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        _poll(lambda: self._listening() or self._died(), 20, "rotel to listen")
        if self.process.poll() is not None:
            raise AssertionError(f"rotel exited: {self.output.read_text()[-2000:]}")

    def _died(self) -> bool:
        return self.process.poll() is not None

    def _listening(self) -> bool:
        for port in (self.grpc_port, self.http_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
        return True

    def spans(self) -> list[dict[str, Any]]:
        """Spans from rotel's detailed debug output: name, status and attributes."""
        spans: list[dict[str, Any]] = []
        current: dict[str, Any] | None = None
        section = ""
        for raw in self.output.read_text(errors="replace").splitlines():
            line = raw.strip()
            if line.startswith("Span #"):
                current = {"attributes": {}}
                spans.append(current)
                section = ""
            elif current is None:
                continue
            elif line.startswith("Name") and ":" in line and "name" not in current:
                current["name"] = line.split(":", 1)[1].strip()
            elif line.startswith("Status code"):
                current["status"] = line.split(":", 1)[1].strip()
            elif line in ("Attributes:", "Events:", "Links:"):
                section = line
            elif line.startswith("SpanEvent #"):
                section = "Events:"
            elif section == "Attributes:" and line.startswith("-> "):
                key, _, value = line[3:].partition(": ")
                match = re.match(r"^\w+\((.*)\)$", value)
                current["attributes"][key] = match.group(1) if match else value
        return spans

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._out.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_spans_reach_a_real_otlp_receiver(tmp_path: Path, ca: TestCA, origin: OriginServer, protocol: str) -> None:
    rotel = Rotel(tmp_path)
    try:
        port = rotel.http_port if protocol == "http" else rotel.grpc_port
        config = _config(otlp_endpoint=f"http://127.0.0.1:{port}", otlp_protocol=protocol)
        gateway = GatewayProcess(tmp_path / "gw", config, _policies(origin.port))
        gateway.start(extra_env={"OTEL_BSP_SCHEDULE_DELAY": "200"})
        try:
            assert curl(gateway, f"https://{STRIPE}:{origin.port}/", ca=ca).status == 200
            assert curl(gateway, f"https://dashboard.stripe.test:{origin.port}/", ca=ca).connect_status == 403
            spans = _poll(lambda: len(rotel.spans()) >= 2 and rotel.spans(), 30, "two spans at the OTLP receiver")
        finally:
            gateway.stop()
    finally:
        rotel.stop()
    by_decision = {s["attributes"].get("egress.decision"): s for s in spans}
    allowed, denied = by_decision["allow"], by_decision["deny"]
    assert allowed["name"] == denied["name"] == "egress CONNECT"
    assert allowed["attributes"]["server.address"] == STRIPE
    assert allowed["attributes"]["tls.client.server_name"] == STRIPE
    assert allowed["attributes"]["k8s.namespace.name"] == "shop"
    assert allowed["attributes"]["egress.rule"] == "stripe-api"
    assert allowed["status"] == "STATUS_CODE_UNSET"
    assert denied["attributes"]["egress.reason"] == "denied_by_rule"
    assert denied["attributes"]["egress.rule"] == "no-dashboard"
    assert denied["status"] == "STATUS_CODE_ERROR"


def test_unreachable_otlp_endpoint_does_not_slow_or_break_proxying(
    tmp_path: Path, ca: TestCA, origin: OriginServer
) -> None:
    trail = tmp_path / "audit.jsonl"
    config = _config(file=str(trail), otlp_endpoint=f"http://127.0.0.1:{_free_port()}", otlp_protocol="http")
    gateway = GatewayProcess(tmp_path / "gw", config, _policies(origin.port))
    gateway.start(extra_env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    durations = []
    try:
        for _ in range(15):
            started = time.monotonic()
            result = curl(gateway, f"https://{STRIPE}:{origin.port}/", ca=ca)
            durations.append(time.monotonic() - started)
            assert result.status == 200, result.stderr
        # Export attempts to the dead endpoint have failed by now, and are being retried (counted), not raised.
        _poll(
            lambda: _sample(_metrics(gateway), "egress_gateway_span_export_retries_total", exporter="otlp") > 0,
            30,
            "a counted OTLP export retry",
        )
        # The trail file has its own queue: it is complete while OTLP keeps failing.
        _poll(lambda: len(span_lines(trail.read_text())) == 15, 10, "15 spans in the trail file")
    finally:
        stopped = time.monotonic()
        assert gateway.stop() == 0
        stop_s = time.monotonic() - stopped
    durations.sort()
    assert durations[-2] < 2.0, f"slowest requests: {durations[-3:]}"
    assert stop_s < 25, f"shutdown took {stop_s:.1f}s with an unreachable OTLP endpoint"


def test_sigkill_during_an_open_tunnel_leaves_its_open_record(tmp_path: Path, ca: TestCA, origin: OriginServer) -> None:
    """The `open` record is written within audit.flush_interval_s of the decision, whatever happens to the process
    afterwards; `audit --open` lists the connection that never closed, and the chain up to the kill verifies."""
    from tests.proxy.conftest import connect, tls_through

    trail = tmp_path / "audit.jsonl"
    gateway = GatewayProcess(tmp_path / "gw", _config(file=str(trail), flush_interval_s=0.2), _policies(origin.port))
    gateway.start()
    try:
        assert curl(gateway, f"https://{STRIPE}:{origin.port}/", ca=ca).status == 200  # one closed connection
        answer = connect(gateway.proxy_port, f"{STRIPE}:{origin.port}")
        assert answer.status == 200
        tunnel = tls_through(answer, ca, STRIPE)
        body = b"x" * 100_000
        tunnel.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {STRIPE}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        assert tunnel.recv(65536).startswith(b"HTTP/1.1 ")  # 100 kB went through the open tunnel
        _poll(lambda: trail.read_text().count('"recordType":"open"') == 2, 5, "the tunnel's open record")
    finally:
        gateway.stop(signal.SIGKILL)

    done = _audit(str(trail), "--open", "--output", "json")
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["never_closed"] is True
    assert (row["server.address"], row["egress.decision"], row["egress.rule"]) == (STRIPE, "allow", "stripe-api")
    assert row["k8s.namespace.name"] == "shop" and row["k8s.pod.name"] == "payments-1"
    assert len(_audit(str(trail), "--output", "json").stdout.splitlines()) == 2  # the closed one and the open one
    done = _audit("verify", str(trail))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ends without a final checkpoint" in done.stdout


def test_policy_records_say_what_was_in_force_and_decisions_link_to_them(
    tmp_path: Path, ca: TestCA, origin: OriginServer
) -> None:
    trail = tmp_path / "audit.jsonl"
    config = _config(
        file=str(trail), flush_interval_s=0.2, policy_annotations=["example.com/owner", "example.com/ticket"]
    )
    policies = _policies(origin.port)
    annotated = policies["shop.yaml"].replace(
        "metadata: {name: payments, namespace: shop}",
        "metadata: {name: payments, namespace: shop, "
        'annotations: {example.com/owner: team-pay, example.com/ticket: "CHG-1"}}',
    )
    gateway = GatewayProcess(tmp_path / "gw", config, {**policies, "shop.yaml": annotated})
    gateway.start()
    try:
        assert curl(gateway, f"https://{STRIPE}:{origin.port}/", ca=ca).status == 200
        first = gateway.wait_for("policies_in_force")
        gateway.write_policy("shop.yaml", annotated.replace('"CHG-1"', '"CHG-2"').replace("no-dashboard", "no-dash"))
        second = gateway.wait_for("policies_in_force", lambda e: e["snapshot"] != first["snapshot"])
        assert curl(gateway, f"https://{STRIPE}:{origin.port}/", ca=ca).status == 200
    finally:
        assert gateway.stop() == 0

    records = [json.loads(line) for line in trail.read_text().splitlines()]
    snapshots = [r for r in records if r.get("recordType") == "policy"]
    assert [s["snapshot"] for s in snapshots] == [first["snapshot"], second["snapshot"]]
    before, after = snapshots
    assert before["config"]["default_action"] == "Allow" and before["config"]["allowed_ranges"] == ["127.0.0.0/8"]
    assert before["config"]["hash"] == after["config"]["hash"]
    payments = [next(p for p in s["policies"] if p["name"] == "payments") for s in snapshots]
    assert payments[0]["version"] != payments[1]["version"] and payments[0]["contentHash"] != payments[1]["contentHash"]
    assert payments[0]["annotations"] == {"example.com/owner": "team-pay", "example.com/ticket": "CHG-1"}
    assert {p["name"] for p in before["policies"]} == {"payments", "onboarding"}

    # Each connection links to the snapshot in force when it was decided, and carries its policy's annotations.
    spans = [r for r in records if "recordType" not in r]
    attributes = [{a["key"]: a["value"].get("stringValue") for a in s["attributes"]} for s in spans]
    assert [a["egress.policy_snapshot"] for a in attributes] == [before["snapshot"], after["snapshot"]]
    assert [a["egress.policy.version"] for a in attributes] == [p["version"] for p in payments]
    assert [a["egress.policy.annotation.example.com/ticket"] for a in attributes] == ["CHG-1", "CHG-2"]

    done = _audit("show-policy", after["snapshot"], str(trail))
    assert done.returncode == 0, done.stderr
    assert f"snapshot {after['snapshot']}" in done.stdout and "EgressPolicy/shop/payments" in done.stdout
    assert "example.com/ticket: CHG-2" in done.stdout and "CHG-1" not in done.stdout
    done = _audit("show-policy", payments[0]["version"], str(trail), "--output", "json")
    assert [json.loads(line)["snapshot"] for line in done.stdout.splitlines()] == [before["snapshot"]]
    assert _audit("show-policy", "sha256:0000", str(trail)).returncode == 1
    assert _audit("verify", str(trail)).returncode == 0


def test_a_break_glass_tunnel_is_closed_at_expiry_and_revocations_name_their_change(
    tmp_path: Path, ca: TestCA, origin: OriginServer
) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.proxy.conftest import closed_by_peer, connect, tls_through

    trail = tmp_path / "audit.jsonl"
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=8)
    policies = _policies(origin.port)
    shop = policies["shop.yaml"].replace(
        "- {name: no-dashboard,",
        f'- {{name: break-glass, hosts: ["pypi.test"], ports: [{origin.port}], expires: "{expires.isoformat()}"}}\n'
        "    - {name: no-dashboard,",
    )
    gateway = GatewayProcess(
        tmp_path / "gw", _config(file=str(trail), flush_interval_s=0.2), {**policies, "shop.yaml": shop}
    )
    gateway.start()
    try:
        glass = tls_through(connect(gateway.proxy_port, f"pypi.test:{origin.port}"), ca, "pypi.test")
        edited = tls_through(connect(gateway.proxy_port, f"{STRIPE}:{origin.port}"), ca, STRIPE)
        # An edit of `payments` that drops the stripe rule revokes the stripe tunnel, naming the edit.
        gateway.write_policy("shop.yaml", shop.replace(f"hosts: [{STRIPE}]", "hosts: [other.test]"))
        assert closed_by_peer(edited, timeout=5)
        assert closed_by_peer(glass, timeout=(expires - datetime.now(UTC)).total_seconds() + 5)
        late = (datetime.now(UTC) - expires).total_seconds()
        assert -0.1 < late < 1.5, f"closed {late:.2f} s after its rule expired"
        gateway.wait_for("rule_expired")
    finally:
        assert gateway.stop() == 0

    done = _audit(str(trail), "--output", "json")
    rows = {r["server.address"]: r for r in map(json.loads, done.stdout.splitlines())}
    expired, revoked = rows["pypi.test"], rows[STRIPE]
    assert expired["egress.reason"] == "expired"
    assert expired["egress.change"].startswith("rule break-glass of EgressPolicy/shop/payments (version ")
    assert expired["egress.change.policies"] == "EgressPolicy/shop/payments"
    assert revoked["egress.reason"] == "revoked"
    assert re.fullmatch(r"EgressPolicy/shop/payments version \S+ -> \S+", revoked["egress.change"]), revoked
    assert "a policy change (EgressPolicy/shop/payments version" in revoked["egress.message"]
    for wanted in ("shop/payments", "EgressPolicy/shop/payments", "payments"):
        found = _audit(str(trail), "--policy", wanted, "--output", "json").stdout.splitlines()
        assert {json.loads(r)["server.address"] for r in found} == {"pypi.test", STRIPE}


def test_otlp_down_for_10_s_then_up_delivers_every_span(tmp_path: Path, ca: TestCA, origin: OriginServer) -> None:
    """The receiver is down while connections are made; the gateway buffers and retries with backoff, and once the
    receiver is up every span arrives, in order. The trail file is complete all along."""
    trail = tmp_path / "audit.jsonl"
    port = _free_port()
    config = _config(file=str(trail), otlp_endpoint=f"http://127.0.0.1:{port}", otlp_protocol="http")
    gateway = GatewayProcess(tmp_path / "gw", config, _policies(origin.port))
    gateway.start(extra_env={"OTEL_BSP_SCHEDULE_DELAY": "100"})
    rotel: Rotel | None = None
    try:
        down_since = time.monotonic()
        for index in range(12):
            url = (
                f"https://{STRIPE}:{origin.port}/{index}"
                if index % 3
                else f"https://dashboard.stripe.test:{origin.port}/"
            )
            curl(gateway, url, ca=ca)
        _poll(lambda: len(span_lines(trail.read_text())) == 12, 10, "12 spans in the trail file")
        _poll(
            lambda: _sample(_metrics(gateway), "egress_gateway_span_export_retries_total", exporter="otlp") >= 2,
            15,
            "retries",
        )
        time.sleep(max(0.0, 10 - (time.monotonic() - down_since)))
        (tmp_path / "rotel").mkdir()
        rotel = Rotel(tmp_path / "rotel", http_port=port)
        spans = _poll(lambda: len(rotel.spans()) >= 12 and rotel.spans(), 60, "every span at the OTLP receiver")
        metrics = _metrics(gateway)
    finally:
        assert gateway.stop() == 0
        if rotel is not None:
            rotel.stop()
    assert len(spans) == 12 == len(span_lines(trail.read_text()))
    assert sorted(s["attributes"].get("egress.decision") for s in spans) == ["allow"] * 8 + ["deny"] * 4
    assert _sample(metrics, "egress_gateway_span_export_dropped_total", exporter="otlp") == 0
    assert _sample(metrics, "egress_gateway_spans_exported_total", exporter="otlp") == 12


def test_audit_follow_shows_a_new_connection_within_a_second(tmp_path: Path, ca: TestCA, origin: OriginServer) -> None:
    trail = tmp_path / "audit.jsonl"
    gateway = GatewayProcess(tmp_path / "gw", _config(file=str(trail), flush_interval_s=0.5), _policies(origin.port))
    gateway.start()
    command = [sys.executable, "-m", "egress_gateway", "audit", "--follow", str(trail)]
    as_json = subprocess.Popen(
        [*command, "--namespace", "shop", "--output", "json"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    as_text = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # both followers are at the end of the file
        curl(gateway, f"https://pypi.test:{origin.port}/", ca=ca, source=ANALYTICS_POD)  # filtered out of as_json
        started = time.monotonic()
        curl(gateway, f"https://dashboard.stripe.test:{origin.port}/", ca=ca)
        assert as_json.stdout is not None and as_text.stdout is not None
        row = json.loads(as_json.stdout.readline())
        took = time.monotonic() - started
        first, second = as_text.stdout.readline(), as_text.stdout.readline()
    finally:
        for follower in (as_json, as_text):
            follower.terminate()
            follower.wait(10)
        gateway.stop()
    assert took < 1.5, f"the connection showed {took:.2f} s after it was made"  # contract 1 s, margin for a loaded CI
    assert (row["server.address"], row["egress.decision"], row["egress.reason"]) == (
        "dashboard.stripe.test",
        "deny",
        "denied_by_rule",
    )
    assert row["k8s.namespace.name"] == "shop" and row["record"] == "open"
    assert " analytics/reports-1 -> CONNECT pypi.test:" in first and "ALLOW no_policy" in first
    assert " shop/payments-1 -> CONNECT dashboard.stripe.test:" in second
    assert "DENY denied_by_rule by EgressPolicy/shop/payments rule no-dashboard" in second
