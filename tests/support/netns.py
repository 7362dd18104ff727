"""Guard for tests that name non-loopback destinations (metadata, private, public addresses).

Such a test must only run where a bug cannot send a packet off the machine: a network namespace whose only link is
`lo` (CI runs the suite under `unshare -n`). Elsewhere it skips, and under CI=true it fails instead of skipping.
"""

from __future__ import annotations

import os
import subprocess

import pytest


def only_loopback() -> bool:
    try:
        out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    names = [line.split(":", 2)[1].strip() for line in out.splitlines() if line.strip()]
    return names == ["lo"]


def require_isolated_network() -> None:
    if only_loopback():
        return
    message = "needs a network namespace with only loopback (run the suite via scripts/test or `unshare -n`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
