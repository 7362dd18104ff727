"""Validation of one policy object: schema (pydantic) plus the checks that span fields.

Owns: `validate_object(data) -> PolicyObject`, the one validator shared by the file source, the Kubernetes
watcher and `lint`. Every problem comes back as a `FieldError` with a path like `spec.rules[2].hosts[0]`, all in
one pass (the cross-field checks also run on the parts that passed the schema), and an unknown field names the
closest allowed one. Pure: no I/O.
"""

from __future__ import annotations

import difflib
import ipaddress
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

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


def _from_pydantic(exc: ValidationError, model: type[BaseModel]) -> list[FieldError]:
    errors: list[FieldError] = []
    for err in exc.errors(include_url=False):
        # Skip the union/annotated wrapper segments pydantic inserts (e.g. 'int', 'str', 'function-before[...]').
        loc = [p for p in err["loc"] if isinstance(p, int) or not _is_wrapper(p)]
        if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            errors.append(_unknown_field(model, loc))
            continue
        message = err["msg"].removeprefix("Value error, ")
        errors.append(FieldError(field_path(loc), message, _HINTS.get(err["type"], "")))
    return _dedupe(errors)


def _unknown_field(model: type[BaseModel], loc: Sequence[str | int]) -> FieldError:
    """An unknown key, with the closest field name the model has at that place (difflib), if any is close."""
    unknown = str(loc[-1])
    known = _field_names(_model_at(model, loc[:-1]))
    close = difflib.get_close_matches(unknown, known, n=1, cutoff=0.6)
    where = field_path(loc[:-1]) or "the top level"
    if close:
        hint = f"did you mean `{close[0]}`?"
    elif known:
        hint = f"fields allowed in {where}: {', '.join(f'`{name}`' for name in known)}"
    else:
        hint = _HINTS["extra_forbidden"]
    return FieldError(field_path(loc), f"unknown field `{unknown}`", hint)


def _field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that validates the object found at `loc` (list indexes are stepped over)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        by_alias = {info.alias or name: info for name, info in current.model_fields.items()}
        info = by_alias.get(part) or current.model_fields.get(part)
        current = _model_in(info.annotation) if info is not None else None
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside an annotation such as `list[Rule] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


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
            errors.append(_duplicate_rule(i, rule.name, seen[rule.name]))
        seen.setdefault(rule.name, i)
        errors.extend(_rule_errors(i, rule))
    errors.extend(_scope_errors(policy.kind, policy.metadata.namespace))
    return errors


def _partial_semantic_errors(data: Mapping[str, Any], kind: str, model: type[BaseModel]) -> list[FieldError]:
    """The cross-field checks that can still run on the parts of an object that failed schema validation, so that
    one pass reports every problem (not the schema errors now and the rest after they are fixed)."""
    spec = data.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    errors: list[FieldError] = []
    selectors = [("spec.podSelector", "podSelector")]
    if kind == "ClusterEgressPolicy":
        selectors.append(("spec.namespaceSelector", "namespaceSelector"))
    for path, key in selectors:
        try:
            selector = LabelSelector.model_validate(spec.get(key)) if spec.get(key) is not None else None
        except ValidationError:
            continue  # already reported by the schema pass
        errors.extend(_selector_errors(path, selector))
    raw_rules = spec.get("rules")
    rule_model = _model_at(model, ("spec", "rules")) or Rule
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rules if isinstance(raw_rules, list) else []):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if isinstance(name, str):
            if name in seen:
                errors.append(_duplicate_rule(i, name, seen[name]))
            seen.setdefault(name, i)
        try:
            rule = rule_model.model_validate(raw)
        except ValidationError:
            continue
        errors.extend(_rule_errors(i, rule))  # type: ignore[arg-type]
    metadata = data.get("metadata")
    if isinstance(metadata, Mapping):  # otherwise the schema pass already said metadata is wrong
        errors.extend(_scope_errors(kind, metadata.get("namespace")))
    return errors


def _duplicate_rule(index: int, name: str, first: int) -> FieldError:
    return FieldError(
        f"spec.rules[{index}].name",
        f"duplicate rule name {name!r} (also spec.rules[{first}])",
        "rule names must be unique within a policy",
    )


def _scope_errors(kind: str, namespace: str | None) -> list[FieldError]:
    if kind == "EgressPolicy" and not namespace:
        return [FieldError("metadata.namespace", "an EgressPolicy needs a namespace", "set metadata.namespace")]
    if kind == "ClusterEgressPolicy" and namespace:
        return [
            FieldError(
                "metadata.namespace",
                "a ClusterEgressPolicy is cluster-scoped and takes no namespace",
                "remove metadata.namespace, or use kind EgressPolicy",
            )
        ]
    return []


def validate_object(data: Any) -> PolicyObject:
    """Validate one decoded object (a dict from YAML or the API server), either API version.

    Returns the v1alpha2 (storage version) form. Raises `PolicyValidationError`.
    """
    if not isinstance(data, Mapping):
        raise PolicyValidationError([FieldError("", f"expected a mapping (object), got {type(data).__name__}")])
    api_version = data.get("apiVersion")
    kind = data.get("kind")
    errors: list[FieldError] = []
    if api_version not in GROUP_VERSIONS:
        errors.append(
            FieldError(
                "apiVersion",
                f"expected one of {', '.join(GROUP_VERSIONS)}, got {api_version!r}",
                f"set apiVersion: {GROUP_VERSION}",
            )
        )
    if not isinstance(kind, str) or kind not in KINDS:
        errors.append(
            FieldError("kind", f"expected one of {', '.join(sorted(KINDS))}, got {kind!r}", "set kind: EgressPolicy")
        )
        raise PolicyValidationError(errors)
    # An unknown apiVersion is reported above; the rest is still checked, against the storage version.
    version = str(api_version) if api_version in GROUP_VERSIONS else GROUP_VERSION
    model = MODELS[(version, kind)]
    try:
        policy = to_storage_version(model.model_validate({**data, "apiVersion": version}))
    except ValidationError as exc:
        errors.extend(_from_pydantic(exc, model))
        errors.extend(_partial_semantic_errors(data, kind, model))
        raise PolicyValidationError(_dedupe(errors)) from None
    errors.extend(_semantic_errors(policy))
    if errors:
        raise PolicyValidationError(errors)
    return policy
