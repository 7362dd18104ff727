"""The soak in its short CI form: ~45 s of mixed load (bench/soak.py), zero unexpected answers, the gateway alive,
and RSS and open descriptors flat after warm-up. The 10-minute form and its last figures: docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_short_soak_is_flat_and_error_free(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "45", "--sample-every", "3", "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
    )
    result = json.loads(done.stdout)
    verdict = result["verdict"]
    assert verdict["gateway_alive_at_end"]
    assert verdict["errors"] == 0, result["error_examples"]
    for kind in ("https", "denied", "plain", "bulk", "hostile", "idle_tunnel", "policy_edits"):
        assert result["counts"].get(kind, 0) > 0, kind
    assert verdict["rss_flat"], result["rss_mib"]
    assert verdict["fds_flat"], result["fds"]
    assert done.returncode == 0
