"""Assertions on the objects the chart renders: RBAC, the Deployment's safety settings, the config contract with
`egress_gateway.settings`, Services, PDB/HPA/ServiceMonitor and the install notes."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from egress_gateway.settings import Settings, load_settings
from tests.chart.conftest import ALL_FEATURES, CHART, NAMESPACE, RELEASE, REPO, Helm, find, one

FULLNAME = f"{RELEASE}-egress-gateway"
SELECTOR = {"app.kubernetes.io/name": "egress-gateway", "app.kubernetes.io/instance": RELEASE}


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _rules(objects: list[dict[str, Any]], kind: str) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """Flatten RBAC rules into (apiGroup, resource, verbs, resourceNames) rows."""
    rows = []
    for obj in find(objects, kind):
        for rule in obj["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rows.append((group, resource, tuple(rule["verbs"]), tuple(rule.get("resourceNames", ()))))
    return rows


# ---- chart metadata ----


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


def test_readme_documents_every_value() -> None:
    """Every key the values schema defines (objects it treats as opaque Kubernetes types count as one key)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()

    def keys(node: dict[str, Any], prefix: str = "") -> list[str]:
        found = []
        for key, sub in node.get("properties", {}).items():
            opaque = "properties" not in sub or sub.get("description", "").startswith("Kubernetes ")
            found += [f"{prefix}{key}"] if opaque else keys(sub, f"{prefix}{key}.")
        return found

    missing = [key for key in keys(schema) if key != "global" and f"`{key}`" not in readme]
    assert not missing, f"README.md values table lacks: {missing}"


# ---- RBAC ----


def test_rbac_has_no_wildcards(all_objects: list[dict[str, Any]], default_objects: list[dict[str, Any]]) -> None:
    for objects in (default_objects, all_objects):
        for kind in ("ClusterRole", "Role"):
            for group, resource, verbs, _ in _rules(objects, kind):
                assert "*" not in group and "*" not in resource and "*" not in verbs, (kind, group, resource)


def test_cluster_role_grants_exactly_what_the_gateway_calls(all_objects: list[dict[str, Any]]) -> None:
    assert sorted(_rules(all_objects, "ClusterRole")) == sorted(
        [
            ("egressgateway.io", "egresspolicies", ("get", "list", "watch"), ()),
            ("egressgateway.io", "clusteregresspolicies", ("get", "list", "watch"), ()),
            ("egressgateway.io", "egresspolicies/status", ("patch",), ()),
            ("egressgateway.io", "clusteregresspolicies/status", ("patch",), ()),
            ("", "pods", ("get", "list", "watch"), ()),
            ("", "namespaces", ("get", "list", "watch"), ()),
            ("authentication.k8s.io", "tokenreviews", ("create",), ()),
            ("", "serviceaccounts", ("list", "watch"), ()),
        ]
    )


def test_tokenreviews_only_with_service_account_token_identity(default_objects: list[dict[str, Any]]) -> None:
    resources = {resource for _, resource, _, _ in _rules(default_objects, "ClusterRole")}
    assert "tokenreviews" not in resources  # default identity.mode is [pod-ip]
    assert "serviceaccounts" not in resources  # watched only to revoke cached token approvals
    assert {"pods", "namespaces", "egresspolicies", "clusteregresspolicies/status"} <= resources


def test_lease_role_is_namespaced_and_limited_to_the_one_lease(default_objects: list[dict[str, Any]]) -> None:
    role = one(default_objects, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert sorted(_rules(default_objects, "Role")) == [
        ("coordination.k8s.io", "leases", ("create",), ()),
        ("coordination.k8s.io", "leases", ("get", "update"), (f"{FULLNAME}-status",)),
    ]
    binding = one(default_objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    cluster_binding = one(default_objects, "ClusterRoleBinding")
    assert cluster_binding["subjects"] == binding["subjects"]
    assert one(default_objects, "ServiceAccount")["metadata"]["name"] == FULLNAME


def test_files_source_needs_no_policy_or_lease_permissions(helm3: Helm) -> None:
    objects = helm3.objects(set_values=("config.policySource=files",))
    resources = {resource for _, resource, _, _ in _rules(objects, "ClusterRole")}
    assert resources == {"pods", "namespaces"}
    assert not find(objects, "Role")
    policies = one(objects, "ConfigMap", f"{FULLNAME}-policies")
    assert policies["metadata"]["namespace"] == NAMESPACE
    mounts = {m["name"]: m["mountPath"] for m in _container(objects)["volumeMounts"]}
    assert mounts["policies"] == "/etc/egress-gateway/policies"


def test_file_policies_with_static_identity_get_no_cluster_access_and_no_token(helm3: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "config:\n  policySource: files\n  identity:\n    mode: [static]\n"
        "    static: [{cidr: 10.1.0.0/16, namespace: shop}]\n"
    )
    objects = helm3.objects(values)
    assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    # The gateway never calls the API server, so no token is mounted for it to leak.
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    settings = _rendered_settings(objects, tmp_path)
    assert settings.policy_source == "files" and settings.identity.mode == ["static"]


def test_kubernetes_policies_with_static_identity_read_no_pods_or_namespaces(helm3: Helm) -> None:
    objects = helm3.objects(set_values=("config.identity.mode={static}",))
    resources = {resource for _, resource, _, _ in _rules(objects, "ClusterRole")}
    assert resources == {
        "egresspolicies",
        "clusteregresspolicies",
        "egresspolicies/status",
        "clusteregresspolicies/status",
    }
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is True
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


def test_read_only_status_drops_status_and_lease_permissions(helm3: Helm, tmp_path: Path) -> None:
    objects = helm3.objects(set_values=("config.kubernetes.writeStatus=false",))
    rules = _rules(objects, "ClusterRole")
    assert ("egressgateway.io", "egresspolicies", ("get", "list", "watch"), ()) in rules
    assert not [row for row in rules if row[1].endswith("/status")]
    assert not find(objects, "Role") and not find(objects, "RoleBinding")
    assert _rendered_settings(objects, tmp_path).kubernetes.write_status is False


# ---- Deployment ----


def test_two_replicas_spread_across_nodes(default_objects: list[dict[str, Any]]) -> None:
    spec = one(default_objects, "Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spread = {c["topologyKey"]: c for c in spec["template"]["spec"]["topologySpreadConstraints"]}
    by_node = spread["kubernetes.io/hostname"]
    assert by_node["whenUnsatisfiable"] == "DoNotSchedule" and by_node["maxSkew"] == 1
    # Tainted nodes the pods cannot use must not count as empty domains, or DoNotSchedule leaves pods Pending.
    assert by_node["nodeTaintsPolicy"] == "Honor"
    assert by_node["labelSelector"] == {"matchLabels": SELECTOR}
    assert by_node["matchLabelKeys"] == ["pod-template-hash"]
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spec["selector"]["matchLabels"] == SELECTOR


def test_probes_on_the_admin_port(default_objects: list[dict[str, Any]]) -> None:
    container = _container(default_objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"proxy": 3128, "admin": 9901}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}


def test_security_context_is_locked_down(default_objects: list[dict[str, Any]]) -> None:
    pod = one(default_objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = _container(default_objects)["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["privileged"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod


def test_writable_paths_are_volumes(default_objects: list[dict[str, Any]]) -> None:
    """With a read-only root filesystem, everything the gateway writes must be a mounted volume."""
    mounts = {m["mountPath"]: m for m in _container(default_objects)["volumeMounts"]}
    config = yaml.safe_load(one(default_objects, "ConfigMap")["data"]["config.yaml"])
    assert config["data_dir"] in mounts and not mounts[config["data_dir"]].get("readOnly")
    assert "/tmp" in mounts
    assert mounts["/etc/egress-gateway/config.yaml"]["readOnly"] is True


def test_container_runs_the_gateway_with_the_rendered_config(default_objects: list[dict[str, Any]]) -> None:
    container = _container(default_objects)
    assert container["image"] == "egress-gateway:0.1.0"
    assert container["args"] == ["--config", "/etc/egress-gateway/config.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_termination_grace_covers_pre_stop_and_shutdown_grace(helm3: Helm, tmp_path: Path) -> None:
    values = tmp_path / "grace.yaml"  # --set would pass 42.5 as a string
    values.write_text("config:\n  shutdownGraceSeconds: 42.5\npreStopSleepSeconds: 7\n")
    objects = helm3.objects(values)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 7 + 43 + 5
    assert pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    config = yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])
    assert config["shutdown_grace_s"] == 42.5


def test_config_change_changes_the_checksum_annotation(helm3: Helm, default_objects: list[dict[str, Any]]) -> None:
    def checksum(objects: list[dict[str, Any]]) -> str:
        annotation: str = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return annotation

    assert len(checksum(default_objects)) == 64
    assert checksum(default_objects) == checksum(helm3.objects())
    assert checksum(default_objects) != checksum(helm3.objects(set_values=("config.log.level=debug",)))


def test_image_digest_and_pull_secrets(all_objects: list[dict[str, Any]]) -> None:
    pod = one(all_objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == (
        "registry.example.com/platform/egress-gateway@sha256:" + "0123456789abcdef" * 4
    )
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]


# ---- the config file: the chart's half of the settings contract ----


def _rendered_settings(objects: list[dict[str, Any]], tmp_path: Path) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    return load_settings(path)


def test_default_config_loads_into_the_settings_model(default_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = _rendered_settings(default_objects, tmp_path)
    assert settings.listen == "0.0.0.0:3128"
    assert settings.admin_listen == "0.0.0.0:9901"
    assert settings.policy_source == "kubernetes"
    assert settings.identity.mode == ["pod-ip"]
    assert settings.default_action == "Deny"
    assert settings.shutdown_grace_s == 25
    assert settings.audit.file is None and settings.audit.otlp_endpoint is None
    assert settings.kubernetes.lease_name == f"{FULLNAME}-status"
    assert settings.kubernetes.lease_namespace == NAMESPACE


def test_all_features_config_loads_into_the_settings_model(all_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = _rendered_settings(all_objects, tmp_path)
    assert settings.identity.mode == ["service-account-token", "pod-ip"]
    assert settings.identity.token_audience == "egress.example.com"
    assert settings.allowed_ranges == ["10.20.0.0/16"]
    assert settings.limits.max_connections == 2_000_000  # not "2e+06": helm's float64 trap
    assert settings.limits.max_header_bytes == 65536
    assert settings.limits.namespace_rate.per_second == 50
    assert settings.resolver.hosts == {"internal-mirror.example.com": ["10.20.1.5"]}
    assert settings.audit.otlp_endpoint == "http://otel-collector.observability.svc:4318"
    assert settings.audit.otlp_headers == {"x-tenant": "platform"}
    assert str(settings.audit.file) == "/var/log/egress-gateway/audit.jsonl"
    assert settings.log.level == "debug"
    mounts = {m["name"]: m["mountPath"] for m in _container(all_objects)["volumeMounts"]}
    assert mounts["audit"] == "/var/log/egress-gateway"
    volumes = {v["name"]: v for v in one(all_objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["audit"]["persistentVolumeClaim"] == {"claimName": "egress-audit"}
    assert settings.audit.checkpoint_interval_s == 30
    assert str(settings.audit.hmac_key_file) == "/etc/egress-gateway/audit-key/key"
    assert mounts["audit-key"] == "/etc/egress-gateway/audit-key"
    assert volumes["audit-key"]["secret"] == {
        "secretName": "egress-audit-hmac",
        "items": [{"key": "key", "path": "key"}],
    }


# Settings the chart leaves at the gateway's defaults on purpose (set them with extraEnv if needed).
NOT_IN_CHART = {
    "kubernetes.kubeconfig": "in a pod the gateway uses its ServiceAccount",
    "kubernetes.context": "in a pod the gateway uses its ServiceAccount",
    "kubernetes.lease_duration_s": "leader-election tuning",
    "kubernetes.renew_deadline_s": "leader-election tuning",
    "kubernetes.retry_period_s": "leader-election tuning",
    "kubernetes.watch_timeout_s": "watch tuning",
    "kubernetes.backoff_max_s": "watch tuning",
    "pod_ip": "the Deployment sets POD_IP from status.podIP",
}


def test_chart_renders_every_setting_or_says_why_not(all_objects: list[dict[str, Any]]) -> None:
    """A setting added to egress_gateway.settings must reach the chart's values, or be listed above."""

    def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
        keys = set()
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys |= model_keys(annotation, f"{prefix}{name}.")
            else:
                keys.add(f"{prefix}{name}")
        return keys

    def rendered_keys(node: Any, prefix: str = "") -> set[str]:
        free_maps = ("resolver.hosts.", "audit.otlp_headers.")  # user keys, not settings
        if isinstance(node, dict) and node and prefix not in free_maps:
            return {key for name, value in node.items() for key in rendered_keys(value, f"{prefix}{name}.")}
        return {prefix.rstrip(".")}

    rendered = yaml.safe_load(one(all_objects, "ConfigMap", FULLNAME)["data"]["config.yaml"])
    missing = model_keys(Settings) - rendered_keys(rendered) - set(NOT_IN_CHART)
    assert not missing, f"settings the chart does not render: {sorted(missing)}"
    assert not set(NOT_IN_CHART) - model_keys(Settings), "NOT_IN_CHART names a setting that no longer exists"


def test_ipv6_bind_address_is_bracketed(helm3: Helm, tmp_path: Path) -> None:
    settings = _rendered_settings(helm3.objects(set_values=("config.bindAddress=::",)), tmp_path)
    assert settings.listen == "[::]:3128"
    assert settings.admin_listen == "[::]:9901"


# ---- Services, PDB, HPA, ServiceMonitor ----


def test_proxy_and_metrics_services(default_objects: list[dict[str, Any]]) -> None:
    proxy = one(default_objects, "Service", FULLNAME)
    assert proxy["spec"]["selector"] == SELECTOR
    assert proxy["spec"]["ports"] == [{"name": "proxy", "port": 3128, "targetPort": "proxy", "protocol": "TCP"}]
    metrics = one(default_objects, "Service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9901, "targetPort": "admin", "protocol": "TCP"}]


def test_pod_disruption_budget(default_objects: list[dict[str, Any]], all_objects: list[dict[str, Any]]) -> None:
    pdb = one(default_objects, "PodDisruptionBudget")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}
    assert one(all_objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_hpa_is_optional_and_owns_the_replica_count(
    default_objects: list[dict[str, Any]], all_objects: list[dict[str, Any]]
) -> None:
    assert not find(default_objects, "HorizontalPodAutoscaler")
    hpa = one(all_objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert hpa["metrics"][0]["resource"] == {
        "name": "cpu",
        "target": {"type": "Utilization", "averageUtilization": 60},
    }
    assert "replicas" not in one(all_objects, "Deployment")["spec"]


def test_service_monitor_scrapes_the_metrics_service(
    default_objects: list[dict[str, Any]], all_objects: list[dict[str, Any]]
) -> None:
    assert not find(default_objects, "ServiceMonitor")
    monitor = one(all_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    metrics_service = one(all_objects, "Service", f"{FULLNAME}-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    proxy_service = one(all_objects, "Service", FULLNAME)
    assert not selector.items() <= proxy_service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# ---- install notes ----


def _notes(helm: Helm, chart_copy: Path, *set_values: str) -> str:
    """Render templates/NOTES.txt with real helm: `helm template` does not print notes and `helm install
    --dry-run` needs a cluster under helm 3, so a scratch copy of the chart carries a probe template."""
    (chart_copy / "notes.txt").write_text((chart_copy / "templates" / "NOTES.txt").read_text())
    (chart_copy / "templates" / "zz-notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\ndata:\n"
        '  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n'
    )
    rendered = helm.template(
        chart=chart_copy, set_values=set_values, extra=("--show-only", "templates/zz-notes-probe.yaml")
    )
    notes: str = yaml.safe_load(rendered)["data"]["notes"]
    return notes


def _env(notes: str) -> dict[str, str]:
    env = yaml.safe_load(textwrap.dedent(notes.split("  env:\n", 1)[1].split("\n\n", 1)[0]))
    return {item["name"]: item["value"] for item in env}


def test_notes_print_proxy_url_and_env(helm: Helm, chart_copy: Path) -> None:
    notes = _notes(helm, chart_copy)
    url = f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:3128"
    assert url in notes
    values = _env(notes)
    assert values["HTTPS_PROXY"] == values["HTTP_PROXY"] == values["https_proxy"] == url
    no_proxy = values["NO_PROXY"].split(",")
    assert values["no_proxy"] == values["NO_PROXY"]
    for entry in (".svc", ".cluster.local", "kubernetes.default.svc", "10.244.0.0/16", "10.96.0.0/12", "localhost"):
        assert entry in no_proxy
    assert "Enforcement is OFF" in notes


def test_notes_follow_cluster_values_and_enforcement(helm: Helm, chart_copy: Path) -> None:
    notes = _notes(
        helm,
        chart_copy,
        "cluster.domain=corp.local",
        "cluster.podCIDRs={10.42.0.0/16}",
        "cluster.serviceCIDRs={10.43.0.0/16}",
        "cluster.apiServerAddresses={api.corp.example}",
        "enforcement.namespaces={shop,analytics}",
    )
    assert f"http://{FULLNAME}.{NAMESPACE}.svc.corp.local:3128" in notes
    no_proxy = _env(notes)["NO_PROXY"].split(",")
    # Enforcement drops direct traffic to pods and Services, so NO_PROXY must not send it there.
    assert "api.corp.example" in no_proxy and "localhost" in no_proxy
    for entry in (".svc", ".corp.local", "10.42.0.0/16", "10.43.0.0/16", "10.244.0.0/16"):
        assert entry not in no_proxy
    assert "enforcement.allowClusterPods=true" in notes
    assert "Enforcement is ON" in notes and "shop, analytics" in notes


@pytest.mark.parametrize(
    "enforcement",
    [("enforcement.allowClusterPods=true", "enforcement.namespaces={shop}"), ()],
    ids=["enforced-with-cluster-pods", "not-enforced"],
)
def test_notes_keep_cluster_traffic_direct_only_where_enforcement_lets_it_through(
    helm3: Helm, chart_copy: Path, enforcement: tuple[str, ...]
) -> None:
    notes = _notes(helm3, chart_copy, "cluster.podCIDRs={10.42.0.0/16}", *enforcement)
    no_proxy = _env(notes)["NO_PROXY"].split(",")
    for entry in (".svc", ".cluster.local", "10.42.0.0/16", "10.96.0.0/12"):
        assert entry in no_proxy


def test_notes_name_the_cluster_policy_kind(helm3: Helm, chart_copy: Path) -> None:
    notes = _notes(helm3, chart_copy, "enforcement.namespaceSelector.matchLabels.team=a")
    assert "(ClusterNetworkPolicy)" in notes
    notes = _notes(
        helm3,
        chart_copy,
        "enforcement.namespaceSelector.matchLabels.team=a",
        "enforcement.clusterPolicyKind=AdminNetworkPolicy",
    )
    assert "(AdminNetworkPolicy)" in notes


def test_helm4_install_dry_run_prints_the_same_notes(chart_copy: Path) -> None:
    from tests.chart.conftest import _require_helm

    helm4 = _require_helm(4)
    result = helm4.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    assert "NOTES:" in result.stdout
    assert _notes(helm4, chart_copy).strip() in result.stdout.split("NOTES:\n", 1)[1]


@pytest.mark.parametrize("values", [(), (ALL_FEATURES,)], ids=["defaults", "all-features"])
def test_every_object_is_labelled_and_namespaced(helm3: Helm, values: tuple[Path, ...]) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ClusterNetworkPolicy", "AdminNetworkPolicy"}
    for obj in helm3.objects(*values):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"]
        elif obj["metadata"]["namespace"] != NAMESPACE:
            assert obj["kind"] == "NetworkPolicy" and obj["metadata"]["name"] == f"{FULLNAME}-enforce"
