"""Validation of one policy object: schema (pydantic) plus the checks that span fields.

Owns: `validate_object(data) -> PolicyObject`, the one validator shared by the file source, the Kubernetes
watcher and `lint`. Every problem comes back as a `FieldError` with a path like `spec.rules[2].hosts[0]`.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from egress_gateway.policy.errors import FieldError, PolicyValidationError
from egress_gateway.policy.model import (
    GROUP_VERSION,
    GROUP_VERSIONS,
    KINDS,
    MODELS,
    Action,
    ClusterEgressPolicySpec,
    LabelSelector,
    LabelSelectorOperator,
    PolicyObject,
    Rule,
    Tier,
    to_storage_version,
)

_HINTS = {
    "extra_forbidden": "remove the field or check its spelling against docs/policy-reference.md",
    "missing": "add the field",
    "literal_error": "",
    "enum": "",
    "string_pattern_mismatch": "use lower-case letters, digits and '-' (at most 63 characters)",
}


def field_path(loc: Sequence[str | int]) -> str:
    """('spec', 'rules', 2, 'hosts', 0) -> 'spec.rules[2].hosts[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _from_pydantic(exc: ValidationError) -> list[FieldError]:
    errors: list[FieldError] = []
    for err in exc.errors(include_url=False):
        # Skip the union/annotated wrapper segments pydantic inserts (e.g. 'int', 'str', 'function-before[...]').
        loc = [p for p in err["loc"] if isinstance(p, int) or not _is_wrapper(p)]
        message = err["msg"].removeprefix("Value error, ")
        errors.append(FieldError(field_path(loc), message, _HINTS.get(err["type"], "")))
    return _dedupe(errors)


def _is_wrapper(part: str) -> bool:
    return part in ("int", "str") or "[" in part


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in errors:
        if (e.field, e.message) not in seen:
            seen.add((e.field, e.message))
            out.append(e)
    return out


def _rule_errors(index: int, rule: Rule) -> list[FieldError]:
    base = f"spec.rules[{index}]"
    errors: list[FieldError] = []
    if not rule.hosts and not rule.cidrs:
        errors.append(
            FieldError(base, "a rule needs `hosts` or `cidrs` (it would match nothing)", "add hosts or cidrs")
        )
    errors.extend(_protocol_errors(base, rule))
    networks = [ipaddress.ip_network(c) for c in rule.cidrs or []]
    for j, text in enumerate(rule.except_ or []):
        carve = ipaddress.ip_network(text)
        if not any(carve.version == n.version and carve.subnet_of(n) for n in networks):  # type: ignore[arg-type]
            errors.append(
                FieldError(
                    f"{base}.except[{j}]",
                    f"{text} is not inside any of the rule's cidrs",
                    "an except entry carves a hole in one of `cidrs`; add the enclosing range to `cidrs`",
                )
            )
    return errors


def _protocol_errors(base: str, rule: Rule) -> list[FieldError]:
    if rule.protocols is None:
        return []
    if rule.action is Action.DENY:
        return [
            FieldError(
                f"{base}.protocols",
                "a Deny rule denies every protocol; `protocols` applies to Allow and Log rules only",
                "remove protocols",
            )
        ]
    if not rule.protocols:
        return [FieldError(f"{base}.protocols", "an empty list allows nothing", "list TLS, HTTP and/or TCP, or omit")]
    errors = []
    for j, protocol in enumerate(rule.protocols):
        if protocol in rule.protocols[:j]:
            errors.append(FieldError(f"{base}.protocols[{j}]", f"duplicate protocol {protocol}", "list it once"))
    return errors


def _selector_errors(path: str, selector: LabelSelector | None) -> list[FieldError]:
    errors: list[FieldError] = []
    for i, expr in enumerate((selector.match_expressions or []) if selector else []):
        needs_values = expr.operator in (LabelSelectorOperator.IN, LabelSelectorOperator.NOT_IN)
        if needs_values and not expr.values:
            errors.append(
                FieldError(
                    f"{path}.matchExpressions[{i}].values",
                    f"operator {expr.operator} needs values",
                    "list values",
                )
            )
        if not needs_values and expr.values:
            errors.append(
                FieldError(
                    f"{path}.matchExpressions[{i}].values",
                    f"operator {expr.operator} takes no values",
                    "remove values, or use In/NotIn",
                )
            )
    return errors


def _semantic_errors(policy: PolicyObject) -> list[FieldError]:
    errors: list[FieldError] = _selector_errors("spec.podSelector", policy.spec.pod_selector)
    if isinstance(policy.spec, ClusterEgressPolicySpec):
        errors.extend(_selector_errors("spec.namespaceSelector", policy.spec.namespace_selector))
    if isinstance(policy.spec, ClusterEgressPolicySpec) and policy.spec.tier is Tier.NAMESPACE:
        for i, cluster_rule in enumerate(policy.spec.rules):
            if cluster_rule.action is Action.PASS:
                errors.append(
                    FieldError(
                        f"spec.rules[{i}].action",
                        "Pass skips the rest of the Admin or Baseline tier; a Namespace-tier policy has none to skip",
                        "use tier: Admin (or Baseline), or action Allow/Deny",
                    )
                )
    seen: dict[str, int] = {}
    rules: list[Rule] = list(policy.spec.rules)
    for i, rule in enumerate(rules):
        if rule.name in seen:
            errors.append(
                FieldError(
                    f"spec.rules[{i}].name",
                    f"duplicate rule name {rule.name!r} (also spec.rules[{seen[rule.name]}])",
                    "rule names must be unique within a policy",
                )
            )
        seen.setdefault(rule.name, i)
        errors.extend(_rule_errors(i, rule))
    if policy.kind == "EgressPolicy" and not policy.metadata.namespace:
        errors.append(FieldError("metadata.namespace", "an EgressPolicy needs a namespace", "set metadata.namespace"))
    if policy.kind == "ClusterEgressPolicy" and policy.metadata.namespace:
        errors.append(
            FieldError(
                "metadata.namespace",
                "a ClusterEgressPolicy is cluster-scoped and takes no namespace",
                "remove metadata.namespace, or use kind EgressPolicy",
            )
        )
    return errors


def validate_object(data: Any) -> PolicyObject:
    """Validate one decoded object (a dict from YAML or the API server), either API version.

    Returns the v1alpha2 (storage version) form. Raises `PolicyValidationError`.
    """
    if not isinstance(data, Mapping):
        raise PolicyValidationError([FieldError("", f"expected a mapping (object), got {type(data).__name__}")])
    api_version = data.get("apiVersion")
    kind = data.get("kind")
    if api_version not in GROUP_VERSIONS:
        raise PolicyValidationError(
            [
                FieldError(
                    "apiVersion",
                    f"expected one of {', '.join(GROUP_VERSIONS)}, got {api_version!r}",
                    f"set apiVersion: {GROUP_VERSION}",
                )
            ]
        )
    if not isinstance(kind, str) or kind not in KINDS:
        raise PolicyValidationError(
            [FieldError("kind", f"expected one of {sorted(KINDS)}, got {kind!r}", "set kind: EgressPolicy")]
        )
    try:
        policy = to_storage_version(MODELS[(str(api_version), kind)].model_validate(data))
    except ValidationError as exc:
        raise PolicyValidationError(_from_pydantic(exc)) from None
    errors = _semantic_errors(policy)
    if errors:
        raise PolicyValidationError(errors)
    return policy
