"""Bounded runs of the atheris fuzzers (the long runs are documented in docs/security.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNS = os.environ.get("FUZZ_RUNS", "20000")


@pytest.mark.parametrize(
    ("harness", "corpus"), [("fuzz_clienthello.py", "clienthello"), ("fuzz_policy_loader.py", "policy")]
)
def test_fuzzer_finds_no_crash_in_a_bounded_run(harness: str, corpus: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    work = tmp_path / corpus
    shutil.copytree(REPO / "fuzz" / "corpus" / corpus, work)
    runs = RUNS if corpus == "clienthello" else str(max(1, int(RUNS) // 40))
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / harness),
            str(work),
            f"-runs={runs}",
            "-max_total_time=60",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
