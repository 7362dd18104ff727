"""The chart through real helm 3 and helm 4: lint, offline validation of every rendered object, and the values
schema rejecting bad values with a clear message."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.chart.conftest import ALL_FEATURES, CHART, NAMESPACE, REPO, Helm, HelmError

KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
# Kinds that are CRDs outside Kubernetes itself; kubernetes-validate has no schema for them, so
# test_rendering.py checks their structure instead.
# Not in kubernetes-validate's schemas: the network-policy-api kinds are validated against their upstream CRDs in
# test_enforcement.py, the monitoring ones by their own tests in test_monitoring.py.
THIRD_PARTY_KINDS = {"ServiceMonitor", "PrometheusRule", "ClusterNetworkPolicy", "AdminNetworkPolicy"}
VALUE_SETS = {
    "defaults": (),
    "all-features": (ALL_FEATURES,),
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict_passes(helm: Helm, values: tuple[Path, ...]) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    for path in values:
        args += ["--values", str(path)]
    result = helm.run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def _kubernetes_validate(manifests: str, kubernetes_version: str) -> subprocess.CompletedProcess[str]:
    """`helm template ... | kubernetes-validate --strict -k VERSION -`"""
    return subprocess.run(
        [str(KUBERNETES_VALIDATE), "--strict", "-k", kubernetes_version, "-"],
        input=manifests,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("kubernetes_version", ["1.29.0", "1.37.0"])
@pytest.mark.parametrize(
    "values",
    [*VALUE_SETS.values(), ("policy-files",)],
    ids=[*VALUE_SETS.keys(), "policy-files"],
)
def test_rendered_manifests_pass_kubernetes_validate_strict(
    helm: Helm, values: tuple[Path | str, ...], kubernetes_version: str, tmp_path: Path
) -> None:
    if values == ("policy-files",):
        policy = (REPO / "policies" / "shop-payments.yaml").read_text()
        source = tmp_path / "files.yaml"
        source.write_text(
            "config:\n  policySource: files\npolicyFiles:\n  shop-payments.yaml: |\n"
            + "".join(f"    {line}\n" for line in policy.splitlines())
        )
        values = (source,)
    rendered = helm.template(*(Path(v) for v in values), extra=("--include-crds",))

    result = _kubernetes_validate(rendered, kubernetes_version)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    passed = [line for line in lines if " passed for resource " in line]
    others = [line for line in lines if line not in passed]
    unexplained = [line for line in others if not any(f"kind {kind} " in line for kind in THIRD_PARTY_KINDS)]
    assert not unexplained, "\n".join(unexplained)
    assert any("customresourcedefinition/egresspolicies.egressgateway.io" in line for line in passed)
    assert any("deployment/" in line for line in passed)


def test_kubernetes_validate_really_rejects_unknown_fields(helm3: Helm) -> None:
    """Guards the test above: strict validation must fail on a field Kubernetes does not know."""
    rendered = helm3.template().replace("revisionHistoryLimit:", "revisionHistoryLimitt:")
    result = _kubernetes_validate(rendered, "1.37.0")
    assert result.returncode != 0
    assert "revisionHistoryLimitt" in result.stdout + result.stderr


UNKNOWN_KEYS = {
    "top level": ("replicas=3", "replicas"),
    "nested": ("config.identity.modes={pod-ip}", "modes"),
    "deeply nested": ("config.audit.otlp.url=http://collector:4318", "url"),
}


@pytest.mark.parametrize("setting, key", UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
def test_schema_rejects_unknown_keys(helm: Helm, setting: str, key: str) -> None:
    with pytest.raises(HelmError) as failure:
        helm.template(set_values=(setting,))
    message = str(failure.value)
    # helm 3: "Additional property replicas is not allowed"; helm 4: "additional properties 'replicas' not allowed"
    assert "values don't meet the specifications of the schema" in message
    assert key in message and "not allowed" in message


# (--set, the field the error must name); the wording differs between helm 3 and helm 4.
BAD_VALUES = {
    "wrong type": ("replicaCount=two", "replicaCount"),
    "string for boolean": ("config.requireSniMatch=maybe", "requireSniMatch"),
    "value outside the enum": ("config.defaultAction=Maybe", "defaultAction"),
    "unknown identity mode": ("config.identity.mode={mtls}", "mode"),
    "port out of range": ("service.port=70000", "port"),
    "not a CIDR": ("config.allowedRanges={example.com}", "allowedRanges"),
    "bad namespace name": ("enforcement.namespaces={Not_A_Namespace}", "namespaces"),
}


@pytest.mark.parametrize("setting, field", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(helm: Helm, setting: str, field: str) -> None:
    with pytest.raises(HelmError) as failure:
        helm.template(set_values=(setting,))
    message = str(failure.value)
    assert "values don't meet the specifications of the schema" in message
    assert field in message


def test_schema_rejection_also_stops_lint(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--set", "replicas=3")
    assert result.returncode != 0
    assert "replicas" in result.stdout + result.stderr


def test_template_guards_give_clear_errors(helm: Helm, tmp_path: Path) -> None:
    with pytest.raises(HelmError, match="must not contain the gateway's own namespace"):
        helm.template(set_values=(f"enforcement.namespaces={{{NAMESPACE}}}",))
    select_all = tmp_path / "select-all.yaml"
    select_all.write_text("enforcement:\n  namespaceSelector:\n    matchLabels: {}\n")
    with pytest.raises(HelmError, match="would select every namespace"):
        helm.template(select_all)
    with pytest.raises(HelmError, match=r"needs admin\.service\.enabled"):
        helm.template(set_values=("serviceMonitor.enabled=true", "admin.service.enabled=false"))
    with pytest.raises(HelmError, match=r"apiServer\.cidrs is empty but the gateway calls the API server"):
        helm.template(set_values=("networkPolicy.enabled=true",))
    with pytest.raises(HelmError, match=r"needs networkPolicy\.ingress\.adminFrom"):
        helm.template(
            set_values=(
                "networkPolicy.enabled=true",
                "networkPolicy.egress.apiServer.cidrs={10.0.0.1/32}",
                "serviceMonitor.enabled=true",
            )
        )


def test_chart_refuses_kubernetes_older_than_1_29(helm: Helm) -> None:
    with pytest.raises(HelmError, match="kubeVersion"):
        helm.template(extra=("--kube-version", "1.28.9"))
    helm.template(extra=("--kube-version", "1.29.0"))


def test_packaged_chart_lints_and_leaves_ci_values_out(helm: Helm, tmp_path: Path) -> None:
    result = helm.run("package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("egress-gateway-*.tgz")
    with tarfile.open(package) as archive:
        names = archive.getnames()
    assert "egress-gateway/values.schema.json" in names
    assert "egress-gateway/crds/egresspolicies.egressgateway.io.yaml" in names
    assert not [name for name in names if name.startswith("egress-gateway/ci/")]
    lint = helm.run("lint", "--strict", str(package))
    assert lint.returncode == 0, lint.stdout + lint.stderr
