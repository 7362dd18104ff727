"""The benchmark harness (bench/): its parsers and /proc readers on plain data, then `bench/run.py --quick` for real.

The end-to-end check starts nginx, Squid and the gateway on loopback and drives them with hey, on a tiny budget.
It asserts that every path carried traffic without errors and that every figure was produced, never a speed: CI
machines are noisy. Without root it skips; as root without nginx, squid-openssl, hey or curl it skips too, unless
CI=true (then .ci/install-system-deps installed them and a skip would hide a broken harness).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.load import parse_hey_summary
from bench.origin import port_free
from bench.procs import cpu_seconds, process_tree
from bench.run import BEGIN, END, EXIT_MISSING, missing_prerequisites, write_markdown

REPO = Path(__file__).resolve().parents[2]

HEY_OUTPUT = """
Summary:
  Total:\t3.0446 secs
  Requests/sec:\t365.5630

Latency distribution:
  10% in 0.0089 secs
  50% in 0.0142 secs
  99% in 0.0384 secs

Status code distribution:
  [200]\t1000 responses
  [403]\t3 responses

Error distribution:
  [5]\tGet "https://origin.bench.test/tiny": proxyconnect tcp: dial tcp 127.0.0.1:1: connect: connection refused
"""


def test_hey_summary_counts_only_200_as_success_and_every_failure_as_an_error() -> None:
    result = parse_hey_summary(HEY_OUTPUT)
    assert result.ok == 1000
    assert result.errors == 8  # 3 non-200 responses + 5 transport errors (a refused CONNECT is one for Go)
    assert result.seconds == pytest.approx(3.0446)
    assert result.conn_per_s == pytest.approx(1000 / 3.0446)
    assert result.p50_ms == pytest.approx(14.2)
    assert result.p99_ms == pytest.approx(38.4)


def test_hey_summary_without_responses_has_no_rate() -> None:
    result = parse_hey_summary("Summary:\n  Total:\t1.0 secs\n\nError distribution:\n  [7]\tdial tcp: refused\n")
    assert (result.ok, result.errors, result.conn_per_s) == (0, 7, 0.0)


def test_markdown_block_is_replaced_in_place_and_other_sections_stay(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Engine decision time\n\nthe lead's table\n")
    write_markdown(doc, "first run\n")
    write_markdown(doc, "second run\n")
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second run" in text and "first run" not in text
    assert "## Engine decision time\n\nthe lead's table\n" in text


def test_cpu_of_a_process_tree_includes_its_children(tmp_path: Path) -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)\n"
    parent_code = (
        f"import subprocess, sys, time\nchild = subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(process_tree(parent.pid)) < 2 or cpu_seconds(parent.pid) < 0.3):
            time.sleep(0.05)
        assert len(process_tree(parent.pid)) == 2
        assert cpu_seconds(parent.pid) >= 0.3  # the child's burn counts for the tree
    finally:
        for pid in reversed(process_tree(parent.pid)):
            os.kill(pid, 15)
        parent.wait(10)


def _free_origin_address() -> str | None:
    for last in range(120, 140):
        address = f"127.0.0.{last}"
        if port_free(address, 443):
            return address
    return None


@pytest.mark.slow
def test_quick_run_measures_every_path(tmp_path: Path) -> None:
    if os.geteuid() != 0:  # scripts/test installs the system packages only as root, and nginx must bind :443
        pytest.skip("the benchmark needs root (nginx binds port 443)")
    address = _free_origin_address()
    missing = missing_prerequisites(address or "127.0.0.120")
    if missing or address is None:
        reason = f"benchmark prerequisites missing: {', '.join(missing) or 'a free 127.0.0.x:443'}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI installs them with .ci/install-system-deps)")
        pytest.skip(reason)
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = [
        sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--duration", "0.5", "--concurrency", "1,4",
        "--idle-tunnels", "20", "--reload-sizes", "100", "--workers", "1", "--decision", "skip",
        "--origin-address", address, "--json", str(out_json), "--markdown", str(out_md),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode != EXIT_MISSING, done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads(out_json.read_text())
    assert [t["name"] for t in data["targets"]] == ["direct", "squid", "gateway"]
    for name, result in data["results"].items():
        for concurrency in ("1", "4"):
            (sample,) = result["samples"][concurrency]
            assert sample["load"]["ok"] > 0, (name, concurrency)
            assert sample["load"]["errors"] == 0, (name, concurrency)
            if name != "direct":
                assert sample["cpu_s"] > 0, (name, concurrency)  # the proxy's CPU was read from /proc
        (bulk,) = result["bulk"]
        assert (bulk["status"], bulk["bytes"]) == (200, 100 * 1024 * 1024), name
        if name != "direct":
            assert result["idle"]["opened"] == 20 and result["idle"]["failed"] == 0, name
            assert result["peak_rss_mib"] > 0, name
    assert data["results"]["gateway"]["audit_lines"] > 0  # the gateway's audit trail was in the path
    (reload,) = data["reloads"]
    assert reload["policies"] == 100 and len(reload["change_ms"]) == 1 and reload["ready_s"] > 0

    markdown = out_md.read_text()
    assert BEGIN in markdown and END in markdown
    assert "| gateway |" in markdown and "| squid |" in markdown
