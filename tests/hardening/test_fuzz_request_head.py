"""Bounded run of the request-head fuzzer (fuzz/fuzz_request_head.py); the long run is in docs/security.md."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_request_head_fuzzer_finds_no_crash_in_a_bounded_run(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "fuzz" / "corpus" / "request_head", corpus)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / "fuzz_request_head.py"),
            str(corpus),
            f"-runs={os.environ.get('FUZZ_RUNS', '20000')}",
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
