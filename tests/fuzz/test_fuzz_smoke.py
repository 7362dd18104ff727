"""Bounded runs of the atheris fuzzers in fuzz/ (the long runs and their results are in docs/security.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("FUZZ_RUNS", "20000"))

# harness, seed corpus, share of FUZZ_RUNS (the policy loader is ~40x slower per input: YAML + pydantic)
HARNESSES = [
    ("fuzz_clienthello.py", "clienthello", 1.0),
    ("fuzz_request_head.py", "request_head", 1.0),
    ("fuzz_policy_loader.py", "policy", 1 / 40),
]


@pytest.mark.parametrize(("harness", "corpus", "share"), HARNESSES)
def test_fuzzer_finds_no_crash_in_a_bounded_run(harness: str, corpus: str, share: float, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    work = tmp_path / corpus
    shutil.copytree(REPO / "fuzz" / "corpus" / corpus, work)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / harness),
            str(work),
            f"-runs={max(1, int(RUNS * share))}",
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
