"""Fixtures for the Helm chart tests: the real helm 3 and helm 4 binaries and a renderer around them.

helm comes from env HELM3 / HELM4 or from .tools/helm{3,4}/helm (put there by .ci/fetch-helm). A missing helm fails
the tests under CI=true and skips them otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "egress-gateway"
ALL_FEATURES = CHART / "ci" / "all-features-values.yaml"
RELEASE = "eg"
NAMESPACE = "egress-system"
HELM_TIMEOUT_S = 120


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


@dataclass(frozen=True)
class Helm:
    major: int
    binary: Path

    def run(self, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        # No kubeconfig and no cluster: everything here is offline rendering.
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "KUBECONFIG": "/nonexistent",
            "HELM_CACHE_HOME": "/tmp/egress-gateway-helm-cache",
            "HELM_CONFIG_HOME": "/tmp/egress-gateway-helm-config",
            "HELM_DATA_HOME": "/tmp/egress-gateway-helm-data",
        }
        return subprocess.run(
            [str(self.binary), *args], cwd=cwd, capture_output=True, text=True, timeout=HELM_TIMEOUT_S, env=env
        )

    def template(
        self,
        *value_files: Path,
        set_values: tuple[str, ...] = (),
        chart: Path = CHART,
        extra: tuple[str, ...] = (),
    ) -> str:
        args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, *extra]
        for path in value_files:
            args += ["--values", str(path)]
        for item in set_values:
            args += ["--set", item]
        result = self.run(*args)
        if result.returncode != 0:
            raise HelmError(result.stderr.strip())
        return result.stdout

    def objects(self, *value_files: Path, set_values: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return [
            doc for doc in yaml.safe_load_all(self.template(*value_files, set_values=set_values)) if doc is not None
        ]


def _find_helm(major: int) -> Path | None:
    from_env = os.environ.get(f"HELM{major}")
    candidates = [Path(from_env)] if from_env else []
    candidates.append(REPO / ".tools" / f"helm{major}" / "helm")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _require_helm(major: int) -> Helm:
    binary = _find_helm(major)
    if binary is None:
        message = f"helm {major} not found (set HELM{major} or run .ci/fetch-helm)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    version = subprocess.run(
        [str(binary), "version", "--short"], capture_output=True, text=True, timeout=HELM_TIMEOUT_S
    ).stdout
    assert version.startswith(f"v{major}."), f"{binary} is {version!r}, expected helm {major}"
    return Helm(major, binary)


@pytest.fixture(scope="session", params=[3, 4], ids=["helm3", "helm4"])
def helm(request: pytest.FixtureRequest) -> Helm:
    return _require_helm(request.param)


@pytest.fixture(scope="session")
def helm3() -> Helm:
    return _require_helm(3)


@pytest.fixture(scope="session")
def default_objects(helm3: Helm) -> list[dict[str, Any]]:
    return helm3.objects()


@pytest.fixture(scope="session")
def all_objects(helm3: Helm) -> list[dict[str, Any]]:
    return helm3.objects(ALL_FEATURES)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture
def chart_copy(tmp_path: Path) -> Iterator[Path]:
    """A scratch copy of the chart for tests that must add a file (never edits the real chart)."""
    target = tmp_path / "egress-gateway"
    shutil.copytree(CHART, target)
    yield target
