"""CustomResourceDefinitions generated from the pydantic models (the models are the single source of truth).

Owns: turning pydantic's JSON Schema into a Kubernetes structural schema ($refs inlined, nullable unions collapsed,
int-or-string ports, no `additionalProperties: false`), plus the status subresource, printer columns and short
names, for both served versions (v1alpha2 stored, v1alpha1 served; no conversion webhook: the API server only
rewrites apiVersion, and the v1alpha1 schema's `tier` default keeps a v1alpha1 cluster policy's meaning, see
docs/policy-reference.md). Only OpenAPI that Kubernetes 1.20 accepts (no CEL). Pure: returns plain dicts.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from egress_gateway.policy.model import (
    API_GROUP,
    API_VERSION,
    LEGACY_API_VERSION,
    ClusterEgressPolicySpec,
    ClusterEgressPolicySpecV1Alpha1,
    EgressPolicySpec,
)

_DROP_KEYS = {"title", "$defs"}

_CONDITION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One condition of the object.",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "description": "Condition type; the gateway writes 'Accepted'."},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
        "reason": {"type": "string", "description": "CamelCase reason, e.g. Valid or InvalidSpec."},
        "message": {
            "type": "string",
            "description": "Human-readable detail, naming the field path on errors.",
        },
        "observedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "The metadata.generation this condition was written for.",
        },
        "lastTransitionTime": {
            "type": "string",
            "format": "date-time",
            "description": "When status last changed.",
        },
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Written by the gateway through the status subresource.",
    "properties": {
        "observedGeneration": {
            "type": "integer",
            "format": "int64",
            "description": "The metadata.generation the gateway last evaluated.",
        },
        "rules": {"type": "integer", "description": "Number of rules in force from this object."},
        "conditions": {
            "type": "array",
            "description": "Accepted=True when the gateway enforces this object, False with the field path if not.",
            "items": _CONDITION_SCHEMA,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _resolve({**target, **extra}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        types = {o.get("type") for o in options}
        if types == {"integer", "string"}:
            return _resolve({**rest, "x-kubernetes-int-or-string": True}, defs)
        if len(options) == 1:
            return _resolve({**options[0], **rest}, defs)
        raise ValueError(f"cannot express union {node['anyOf']} in a structural schema")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "default" and (value is None or isinstance(value, (list, dict))):
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "const":  # Kubernetes' JSONSchemaProps has no `const`
            out["enum"] = [value]
            continue
        if key == "properties":
            out[key] = {name: _resolve(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _resolve(value, defs)
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    resolved: dict[str, Any] = _resolve(schema, schema.get("$defs", {}))
    return resolved


_TOP_LEVEL: dict[str, Any] = {
    "apiVersion": {"type": "string", "description": "egressgateway.io/v1alpha2 (stored) or egressgateway.io/v1alpha1."},
    "kind": {"type": "string", "description": "The kind of this object."},
    # The API server forbids anything but type under metadata (it documents metadata itself).
    "metadata": {"type": "object"},
}


def _version(
    name: str, storage: bool, spec_model: type[BaseModel], description: str, columns: list[dict[str, str]]
) -> dict[str, Any]:
    return {
        "name": name,
        "served": True,
        "storage": storage,
        "subresources": {"status": {}},
        "additionalPrinterColumns": copy.deepcopy(columns),
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": description,
                "required": ["spec"],
                "properties": {
                    **copy.deepcopy(_TOP_LEVEL),
                    "spec": structural_schema(spec_model),
                    "status": copy.deepcopy(STATUS_SCHEMA),
                },
            }
        },
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    scope: str,
    spec_models: tuple[type[BaseModel], type[BaseModel]],
    description: str,
    tier_column: bool = False,
) -> dict[str, Any]:
    columns = [
        *(
            [
                {"name": "Tier", "type": "string", "jsonPath": ".spec.tier"},
                {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
            ]
            if tier_column
            else []
        ),
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
        {"name": "Rules", "type": "integer", "jsonPath": ".status.rules"},
        {
            "name": "Accepted",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    legacy_columns = [c for c in columns if c["name"] != "Priority"]
    current, legacy = spec_models
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "egress-gateway",
                "app.kubernetes.io/part-of": "egress-gateway",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["egress-gateway"],
            },
            "conversion": {"strategy": "None"},
            "versions": [
                _version(API_VERSION, True, current, description, columns),
                _version(LEGACY_API_VERSION, False, legacy, description, legacy_columns),
            ],
        },
    }


def custom_resource_definitions() -> list[dict[str, Any]]:
    return [
        _crd(
            "EgressPolicy",
            "egresspolicies",
            "egp",
            "Namespaced",
            (EgressPolicySpec, EgressPolicySpec),
            "Egress rules for the pods of one namespace (selected by podSelector); selecting a pod allowlists it.",
        ),
        _crd(
            "ClusterEgressPolicy",
            "clusteregresspolicies",
            "cegp",
            "Cluster",
            (ClusterEgressPolicySpec, ClusterEgressPolicySpecV1Alpha1),
            "Egress rules for pods across namespaces (selected by namespaceSelector and podSelector), evaluated in"
            " the Admin tier (before namespaced policies), the Baseline tier (after them) or with them (Namespace).",
            tier_column=True,
        ),
    ]
