"""The chart's crds/ are exactly what `egress-gateway crd` prints, and every example in policies/ is accepted by
those CRD schemas the way `kubectl apply --validate=strict` would (unknown fields rejected)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.conftest import CHART, REPO, Helm

CRDS = CHART / "crds"
POLICIES = sorted((REPO / "policies").glob("*.yaml"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egress_gateway", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_chart_crds_are_byte_identical_to_the_crd_command(tmp_path: Path) -> None:
    result = _cli("crd", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    generated = {p.name: p.read_bytes() for p in tmp_path.glob("*.yaml")}
    shipped = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    assert sorted(shipped) == sorted(generated), "run scripts/sync-crds"
    for name, content in generated.items():
        assert shipped[name] == content, f"crds/{name} is stale: run scripts/sync-crds"


def test_chart_crds_equal_the_printed_multi_document_output() -> None:
    printed = _cli("crd")
    assert printed.returncode == 0, printed.stderr
    shipped = {p.name: p.read_text() for p in CRDS.glob("*.yaml")}
    by_name = {f"{doc['metadata']['name']}.yaml": doc for doc in yaml.safe_load_all(printed.stdout) if doc}
    assert sorted(by_name) == sorted(shipped)
    # Same bytes, document by document, in the order the command prints them.
    assert printed.stdout == "".join(f"---\n{shipped[name]}" for name in by_name)


def test_helm_installs_the_crds_from_crds_dir(helm: Helm) -> None:
    rendered = helm.template(extra=("--include-crds",))
    kinds = {
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] == "CustomResourceDefinition"
    }
    assert kinds == {"egresspolicies.egressgateway.io", "clusteregresspolicies.egressgateway.io"}
    # Helm never templates crds/: the files go to the API server as they are.
    assert "{{" not in "".join(p.read_text() for p in CRDS.glob("*.yaml"))


def _strict(schema: Any) -> Any:
    """What the API server does with fieldValidation=Strict: unknown fields are errors, except under
    metadata (validated by the API server itself) and x-kubernetes-preserve-unknown-fields."""
    schema = copy.deepcopy(schema)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            preserves_unknown = node.get("x-kubernetes-preserve-unknown-fields", False)
            if node.get("type") == "object" and "properties" in node and path != "metadata" and not preserves_unknown:
                node.setdefault("additionalProperties", False)
            for key, value in node.items():
                walk(value, key if key != "properties" else path)
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(schema, "")
    return schema


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    found = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        found[crd["spec"]["names"]["kind"]] = _strict(version["schema"]["openAPIV3Schema"])
    return found


def test_there_are_example_policies() -> None:
    assert POLICIES, "policies/ holds no examples"


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_example_policy_validates_against_the_chart_crd_schema(path: Path, schemas: dict[str, Any]) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for doc in documents:
        assert doc["apiVersion"] == "egressgateway.io/v1alpha1"
        jsonschema.validate(doc, schemas[doc["kind"]], cls=jsonschema.Draft7Validator)


def test_strict_crd_schema_rejects_unknown_fields_and_bad_enums(schemas: dict[str, Any]) -> None:
    good = yaml.safe_load((REPO / "policies" / "shop-payments.yaml").read_text())
    typo = copy.deepcopy(good)
    typo["spec"]["rules"][0]["hostz"] = typo["spec"]["rules"][0].pop("hosts")
    with pytest.raises(jsonschema.ValidationError, match="hostz"):
        jsonschema.validate(typo, schemas["EgressPolicy"], cls=jsonschema.Draft7Validator)
    bad_action = copy.deepcopy(good)
    bad_action["spec"]["rules"][0]["action"] = "Permit"
    with pytest.raises(jsonschema.ValidationError, match="Permit"):
        jsonschema.validate(bad_action, schemas["EgressPolicy"], cls=jsonschema.Draft7Validator)
