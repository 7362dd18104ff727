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


def _crds() -> dict[str, Any]:
    return {(crd := yaml.safe_load(p.read_text()))["spec"]["names"]["kind"]: crd for p in CRDS.glob("*.yaml")}


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    """Storage-version (v1alpha2) schemas by kind."""
    found = {}
    for kind, crd in _crds().items():
        (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
        found[kind] = _strict(version["schema"]["openAPIV3Schema"])
    return found


@pytest.fixture(scope="module")
def versioned_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> schema, for every served version."""
    return {
        (f"egressgateway.io/{v['name']}", kind): _strict(v["schema"]["openAPIV3Schema"])
        for kind, crd in _crds().items()
        for v in crd["spec"]["versions"]
        if v["served"]
    }


def test_there_are_example_policies() -> None:
    assert POLICIES, "policies/ holds no examples"


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_example_policy_validates_against_the_chart_crd_schema(
    path: Path, versioned_schemas: dict[tuple[str, str], Any]
) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for doc in documents:
        assert doc["apiVersion"] == "egressgateway.io/v1alpha2"
        jsonschema.validate(doc, versioned_schemas[(doc["apiVersion"], doc["kind"])], cls=jsonschema.Draft7Validator)


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


# ---- versions (v1alpha2 stored, v1alpha1 served; no conversion webhook) ----------------------------------------
def test_both_versions_are_served_with_v1alpha2_as_storage_and_no_webhook() -> None:
    for crd in _crds().values():
        versions = {v["name"]: (v["served"], v["storage"]) for v in crd["spec"]["versions"]}
        assert versions == {"v1alpha2": (True, True), "v1alpha1": (True, False)}
        assert crd["spec"]["conversion"] == {"strategy": "None"}


def test_v1alpha1_cluster_policy_defaults_to_the_namespace_tier(versioned_schemas: dict[tuple[str, str], Any]) -> None:
    legacy = _crds()["ClusterEgressPolicy"]["spec"]["versions"][1]
    tier = legacy["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tier"]
    assert (tier["default"], tier["enum"]) == ("Namespace", ["Namespace"])
    assert "priority" not in legacy["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    current = _crds()["ClusterEgressPolicy"]["spec"]["versions"][0]
    assert current["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tier"]["default"] == "Admin"
    admin_via_v1alpha1 = {
        "apiVersion": "egressgateway.io/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": "x"},
        "spec": {"tier": "Admin", "rules": [{"name": "a", "action": "Pass", "hosts": ["a.example.com"]}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            admin_via_v1alpha1,
            versioned_schemas[("egressgateway.io/v1alpha1", "ClusterEgressPolicy")],
            cls=jsonschema.Draft7Validator,
        )


# ---- issue 14 section 3: the server rejects what the gateway rejects, where OpenAPI (Kubernetes 1.20) can say it --
# Keys of apiextensions.k8s.io/v1 JSONSchemaProps that a structural schema may use (Kubernetes 1.20: no CEL).
_JSON_SCHEMA_PROPS = {
    "type", "format", "description", "default", "enum", "maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "maxProperties",
    "minProperties", "required", "items", "properties", "additionalProperties", "nullable", "allOf", "anyOf", "oneOf",
    "not", "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
}  # fmt: skip


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += _nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        out += _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _nodes(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schemas_use_only_openapi_that_kubernetes_1_20_accepts_and_describe_every_field() -> None:
    for kind, crd in _crds().items():
        for version in crd["spec"]["versions"]:
            for path, node in _nodes(version["schema"]["openAPIV3Schema"]):
                where = f"{kind} {version['name']} {path or '<root>'}"
                assert set(node) <= _JSON_SCHEMA_PROPS, f"{where}: {set(node) - _JSON_SCHEMA_PROPS}"
                if path == "metadata":
                    assert node == {"type": "object"}, f"{where}: the API server allows nothing else here"
                if not path.endswith(("[]", "{}")) and path != "metadata":  # the server documents metadata
                    assert node.get("description"), f"{where} has no description (kubectl explain shows <empty>)"
                if node.get("x-kubernetes-int-or-string"):
                    assert "type" not in node, where


def test_rules_are_a_list_map_keyed_by_a_required_name() -> None:
    for kind, crd in _crds().items():
        for version in crd["spec"]["versions"]:
            rules = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]
            assert (rules["x-kubernetes-list-type"], rules["x-kubernetes-list-map-keys"]) == ("map", ["name"]), kind
            assert "name" in rules["items"]["required"]


def _rule_with(schemas: dict[str, Any], kind: str, **fields: Any) -> None:
    doc = {
        "apiVersion": "egressgateway.io/v1alpha2",
        "kind": kind,
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"rules": [{"name": "r", **fields}]},
    }
    jsonschema.validate(doc, schemas[kind], cls=jsonschema.Draft7Validator)


def _lint_accepts(kind: str, **fields: Any) -> bool:
    from egress_gateway.policy.errors import PolicyValidationError
    from egress_gateway.policy.validation import validate_object

    meta = {"name": "p", "namespace": "shop"} if kind == "EgressPolicy" else {"name": "p"}
    try:
        validate_object(
            {
                "apiVersion": "egressgateway.io/v1alpha2",
                "kind": kind,
                "metadata": meta,
                "spec": {"rules": [{"name": "r", **fields}]},
            }
        )
    except PolicyValidationError:
        return False
    return True


def _schema_accepts(schemas: dict[str, Any], kind: str, **fields: Any) -> bool:
    try:
        _rule_with(schemas, kind, **fields)
    except jsonschema.ValidationError:
        return False
    return True


from tests.policy.test_host_grammar import INVALID as INVALID_HOSTS  # noqa: E402
from tests.policy.test_host_grammar import MATCHES as HOST_MATCHES  # noqa: E402

# Lint errors a pattern cannot see without rejecting internationalized names (a leading '-', '!' in a label): the
# server accepts them; `lint` and the object's Accepted=False condition report them.
_HOSTS_ONLY_LINT_REJECTS = {"bang!.example.com", "-bad.example.com"}


@pytest.mark.parametrize("host", sorted({row[0] for row in HOST_MATCHES}))
def test_host_pattern_accepts_every_valid_host(schemas: dict[str, Any], host: str) -> None:
    assert _lint_accepts("EgressPolicy", hosts=[host])
    assert _schema_accepts(schemas, "EgressPolicy", hosts=[host])


@pytest.mark.parametrize("host", [row[0] for row in INVALID_HOSTS])
def test_host_pattern_rejects_what_lint_rejects_where_a_pattern_can(schemas: dict[str, Any], host: str) -> None:
    assert not _lint_accepts("EgressPolicy", hosts=[host])
    assert _schema_accepts(schemas, "EgressPolicy", hosts=[host]) is (host in _HOSTS_ONLY_LINT_REJECTS)


@pytest.mark.parametrize(
    ("field", "value", "server_rejects"),
    [
        ("cidrs", "10.0.0.0/8", False),
        ("cidrs", "2001:db8::/32", False),
        ("cidrs", "10.0.0.1", False),
        ("cidrs", " 10.0.0.0/8 ", False),
        ("cidrs", "10.0.0.0/33", True),
        ("cidrs", "300.0.0.0/8", True),
        ("cidrs", "010.0.0.0/8", True),
        ("cidrs", "example.com", True),
        ("cidrs", "2001:db8::/129", True),
        ("cidrs", "10.0.0.1/8", False),  # host bits set: only lint sees it (with a "did you mean")
        ("ports", 443, False),
        ("ports", "8000-8100", False),
        ("ports", 0, True),
        ("ports", 65536, True),
        ("ports", "0-10", True),
        ("ports", "8000-70000", True),
        ("ports", "http", True),
        ("ports", "9000-8000", False),  # empty range: only lint sees it
    ],
)
def test_cidr_and_port_bounds_agree_with_lint(
    schemas: dict[str, Any], field: str, value: Any, server_rejects: bool
) -> None:
    fields: dict[str, Any] = {field: [value]}
    if field == "ports":
        fields["hosts"] = ["a.example.com"]
    lint_accepts = _lint_accepts("EgressPolicy", **fields)
    assert _schema_accepts(schemas, "EgressPolicy", **fields) is not server_rejects
    if not lint_accepts:
        return
    assert not server_rejects, "the server must never reject what the gateway accepts"


def test_pass_is_a_cluster_only_action(schemas: dict[str, Any]) -> None:
    assert not _schema_accepts(schemas, "EgressPolicy", action="Pass", hosts=["a.example.com"])
    assert not _lint_accepts("EgressPolicy", action="Pass", hosts=["a.example.com"])
    assert _schema_accepts(schemas, "ClusterEgressPolicy", action="Pass", hosts=["a.example.com"])
    assert _lint_accepts("ClusterEgressPolicy", action="Pass", hosts=["a.example.com"])
