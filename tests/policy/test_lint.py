"""`egress-gateway lint` on real files: one test per warning, --strict, did-you-mean, every error in one pass, and
messages that read as English. Run as a subprocess, the way CI calls it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.policy.test_cli import cli

HEADER = "apiVersion: egressgateway.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: payments, namespace: shop}\n"


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def policy(*rules: str, header: str = HEADER) -> str:
    return header + "spec:\n  rules:\n" + "".join(f"    - {rule}\n" for rule in rules)


STRIPE = "{name: stripe-api, hosts: [api.stripe.com], ports: [443]}"


def lint_json(*args: str) -> tuple[int, dict[str, object]]:
    result = cli("lint", "--output", "json", *args)
    return result.returncode, json.loads(result.stdout)


def codes(payload: dict[str, object]) -> list[str]:
    return [w["code"] for w in payload["warnings"]]  # type: ignore[attr-defined,index]


def test_a_clean_policy_has_no_warnings(tmp_path: Path) -> None:
    code, payload = lint_json(str(write(tmp_path, policy(STRIPE))))
    assert code == 0 and payload["warnings"] == []


def test_expired_rule_warns_and_passes_unless_strict(tmp_path: Path) -> None:
    path = write(
        tmp_path, policy(STRIPE, '{name: migration, hosts: [old.example.com], expires: "2020-01-01T00:00:00Z"}')
    )
    result = cli("lint", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        f"{path}: document 0: spec.rules[1].expires: warning (expired_rule): rule `migration` expired at "
        "2020-01-01T00:00:00Z; the gateway ignores it"
    ) in result.stdout
    assert "1 warning(s)" in result.stderr
    strict = cli("lint", "--strict", str(path))
    assert strict.returncode == 1 and "--strict: failing" in strict.stderr


def test_public_suffix_wildcard_warns(tmp_path: Path) -> None:
    code, payload = lint_json(str(write(tmp_path, policy(STRIPE, '{name: uk, hosts: ["*.co.uk", "**.github.io"]}'))))
    assert code == 0
    warnings = payload["warnings"]
    assert codes(payload) == ["public_suffix_wildcard", "public_suffix_wildcard"]
    assert [w["field"] for w in warnings] == ["spec.rules[1].hosts[0]", "spec.rules[1].hosts[1]"]  # type: ignore[attr-defined]
    assert "spans `co.uk`, a public suffix" in warnings[0]["message"]  # type: ignore[index]


def test_bucket_wildcard_is_a_public_suffix_wildcard(tmp_path: Path) -> None:
    _, payload = lint_json(str(write(tmp_path, policy('{name: s3, hosts: ["*.s3.amazonaws.com"]}'))))
    assert codes(payload) == ["public_suffix_wildcard"]


def test_one_label_wildcard_warns_when_a_stated_name_is_deeper(tmp_path: Path) -> None:
    path = write(tmp_path, policy('{name: aws, hosts: ["*.amazonaws.com"]}'))
    _, quiet = lint_json(str(path))
    assert quiet["warnings"] == []
    _, payload = lint_json("--name", "s3.us-east-1.amazonaws.com", str(path))
    assert codes(payload) == ["one_label_wildcard"]
    warning = payload["warnings"][0]  # type: ignore[index]
    assert "`*` stands for exactly one label" in warning["message"]
    assert "s3.us-east-1.amazonaws.com" in warning["message"]
    assert "`**.amazonaws.com`" in warning["hint"]
    # a deeper name stated by another rule is evidence too
    _, by_rule = lint_json(
        str(write(tmp_path, policy('{name: aws, hosts: ["*.amazonaws.com", sts.eu-west-1.amazonaws.com]}'), "b.yaml"))
    )
    assert codes(by_rule) == ["one_label_wildcard"]


def test_allow_shadowed_by_a_broader_deny_in_the_same_selection(tmp_path: Path) -> None:
    allow = policy(STRIPE, "{name: paste, hosts: [pastebin.com, www.pastebin.com], ports: [443]}")
    deny = (
        "apiVersion: egressgateway.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: guard, namespace: shop}\n"
        "spec:\n  rules:\n    - {name: stripe-api, hosts: [api.stripe.com], ports: [443]}\n"
        '    - {name: no-paste, action: Deny, hosts: [pastebin.com, "**.pastebin.com"]}\n'
    )
    code, payload = lint_json(str(write(tmp_path, allow + "---\n" + deny)))
    assert code == 0
    assert codes(payload) == ["shadowed_rule"]
    warning = payload["warnings"][0]  # type: ignore[index]
    assert warning["field"] == "spec.rules[1]" and warning["policy"] == "EgressPolicy shop/payments"
    assert "Deny rule `no-paste` of EgressPolicy shop/guard" in warning["message"]
    # a Deny on another namespace, a narrower Deny, or a Deny on other ports shadows nothing
    other_ns = deny.replace("namespace: shop", "namespace: other")
    narrower = deny.replace('[pastebin.com, "**.pastebin.com"]', "[pastebin.com]")
    other_port = deny.replace("action: Deny,", "action: Deny, ports: [80],")
    for variant in (other_ns, narrower, other_port):
        _, clean = lint_json(str(write(tmp_path, allow + "---\n" + variant, "variant.yaml")))
        assert clean["warnings"] == [], variant


def test_allow_shadowed_by_a_cluster_deny_that_selects_its_namespace(tmp_path: Path) -> None:
    cluster = (
        "apiVersion: egressgateway.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: no-paste}\nspec:\n"
        "  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}\n  rules:\n"
        "    - {name: stripe, hosts: [api.stripe.com], ports: [443]}\n"
        '    - {name: no-paste, action: Deny, hosts: ["*.pastebin.com"]}\n'
    )
    allow = policy(STRIPE, "{name: paste, hosts: [www.pastebin.com]}")
    _, payload = lint_json(str(write(tmp_path, allow + "---\n" + cluster)))
    assert codes(payload) == ["shadowed_rule"]
    assert "Deny rule `no-paste` of ClusterEgressPolicy no-paste" in payload["warnings"][0]["message"]  # type: ignore[index]
    elsewhere = cluster.replace("metadata.name: shop", "metadata.name: other")
    _, clean = lint_json(str(write(tmp_path, allow + "---\n" + elsewhere, "elsewhere.yaml")))
    assert clean["warnings"] == []


def test_namespaced_policy_without_allow_rules_allowlists_nothing(tmp_path: Path) -> None:
    code, payload = lint_json(str(write(tmp_path, policy("{name: no-paste, action: Deny, hosts: [pastebin.com]}"))))
    assert code == 0 and codes(payload) == ["allows_nothing"]
    assert "has no Allow rule" in payload["warnings"][0]["message"]  # type: ignore[index]


def test_v1alpha1_deny_only_cluster_policy_is_the_allowlist_trap(tmp_path: Path) -> None:
    header = "apiVersion: egressgateway.io/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: no-pastebin}\n"
    path = write(tmp_path, policy("{name: no-paste, action: Deny, hosts: [pastebin.com]}", header=header))
    result = cli("lint", str(path))
    assert result.returncode == 0
    assert "warning (deny_only_cluster_policy)" in result.stdout
    assert "even under default_action Allow" in result.stdout


def test_unknown_fields_get_a_did_you_mean_at_their_path(tmp_path: Path) -> None:
    text = HEADER + "spec:\n  podSelecter: {}\n  rules:\n    - {name: a, hostz: [x.example.com], prots: [443]}\n"
    result = cli("lint", str(write(tmp_path, text)))
    assert result.returncode == 1
    out = result.stdout
    assert "spec.podSelecter: unknown field `podSelecter`\n    hint: did you mean `podSelector`?" in out
    assert "spec.rules[0].hostz: unknown field `hostz`\n    hint: did you mean `hosts`?" in out
    assert "spec.rules[0].prots: unknown field `prots`\n    hint: did you mean `ports`?" in out
    assert "Extra inputs" not in out


def test_every_error_arrives_in_one_pass(tmp_path: Path) -> None:
    """Schema errors and the cross-field checks (duplicates, except outside cidrs, namespace) in the same run."""
    text = (
        "apiVersion: egressgateway.io/v1alpha9\nkind: EgressPolicy\nmetadata: {name: bad}\nspec:\n  rules:\n"
        "    - {name: a, hosts: [10.0.0.1]}\n"
        "    - {name: a, hosts: [ok.example.com]}\n"
        "    - {name: c, cidrs: [10.0.0.0/8], except: [192.168.0.0/16]}\n"
        "    - {name: d, action: Maybe, hosts: [ok.example.com]}\n"
    )
    code, payload = lint_json(str(write(tmp_path, text)))
    assert code == 1
    fields = {e["field"] for e in payload["errors"]}  # type: ignore[attr-defined]
    assert fields == {
        "apiVersion",
        "spec.rules[0].hosts[0]",
        "spec.rules[1].name",
        "spec.rules[2].except[0]",
        "spec.rules[3].action",
        "metadata.namespace",
    }


def test_a_duplicate_across_files_reads_as_english(tmp_path: Path) -> None:
    write(tmp_path, policy(STRIPE), "a.yaml")
    write(tmp_path, policy(STRIPE), "b.yaml")
    result = cli("lint", str(tmp_path))
    assert result.returncode == 1
    assert f"metadata.name: EgressPolicy shop/payments is also defined in {tmp_path / 'a.yaml'}" in result.stdout
    assert "('EgressPolicy'" not in result.stdout


def test_json_output_lists_policies_with_versions(tmp_path: Path) -> None:
    code, payload = lint_json(str(write(tmp_path, policy(STRIPE))))
    assert code == 0
    (entry,) = payload["policies"]  # type: ignore[misc]
    assert entry["apiVersion"] == "egressgateway.io/v1alpha1"
    assert (entry["kind"], entry["namespace"], entry["name"], entry["document"]) == (
        "EgressPolicy",
        "shop",
        "payments",
        0,
    )
    assert entry["version"].startswith("sha256:")


def test_v1alpha2_tiers_decide_what_shadows_and_what_is_a_trap(tmp_path: Path) -> None:
    """An Admin Deny shadows a namespaced Allow; a Baseline Deny does not (the namespace decides first); an Admin
    Allow at an earlier priority is not shadowed by a later Admin Deny; a deny-only Admin policy is no trap."""
    v2 = "apiVersion: egressgateway.io/v1alpha2\n"
    text = (
        v2 + "kind: ClusterEgressPolicy\nmetadata: {name: no-paste}\nspec:\n  tier: Admin\n  priority: 10\n"
        "  rules:\n    - {name: no-paste, action: Deny, hosts: [pastebin.com, paste.example.org]}\n---\n"
        + v2
        + "kind: ClusterEgressPolicy\nmetadata: {name: early}\nspec:\n  tier: Admin\n  priority: 5\n"
        "  rules:\n    - {name: vendor-paste, hosts: [paste.example.org]}\n---\n"
        + v2
        + "kind: ClusterEgressPolicy\nmetadata: {name: base}\nspec:\n  tier: Baseline\n"
        "  rules:\n    - {name: no-cdn, action: Deny, hosts: [cdn.example.com]}\n---\n"
        + v2
        + "kind: EgressPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n"
        "  rules:\n    - {name: paste, hosts: [pastebin.com]}\n    - {name: cdn, hosts: [cdn.example.com]}\n"
    )
    code, payload = lint_json(str(write(tmp_path, text)))
    assert code == 0, payload
    warnings = [(w["code"], w["policy"], w["field"]) for w in payload["warnings"]]  # type: ignore[attr-defined]
    assert warnings == [("shadowed_rule", "EgressPolicy shop/web", "spec.rules[0]")]
