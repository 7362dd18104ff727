"""CustomResourceDefinitions generated from the pydantic models (the models are the single source of truth).

Owns: turning pydantic's JSON Schema into a Kubernetes structural schema ($refs inlined, nullable unions collapsed,
int-or-string ports, no `additionalProperties: false`), plus the status subresource, printer columns and short
names. Pure: returns plain dicts; the CLI renders them as YAML.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from egress_gateway.policy.model import API_GROUP, API_VERSION, ClusterEgressPolicySpec, EgressPolicySpec

_DROP_KEYS = {"title", "$defs"}

_CONDITION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "description": "Condition type; the gateway writes 'Accepted'."},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string", "description": "CamelCase reason, e.g. Valid or InvalidSpec."},
        "message": {
            "type": "string",
            "description": "Human-readable detail, naming the field path on errors.",
        },
        "observedGeneration": {"type": "integer", "format": "int64"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Written by the gateway through the status subresource.",
    "properties": {
        "observedGeneration": {"type": "integer", "format": "int64"},
        "rules": {"type": "integer", "description": "Number of rules in force from this object."},
        "conditions": {
            "type": "array",
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


def _crd(
    kind: str, plural: str, short: str, scope: str, spec_model: type[BaseModel], description: str
) -> dict[str, Any]:
    columns = [
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
        {"name": "Rules", "type": "integer", "jsonPath": ".status.rules"},
        {
            "name": "Accepted",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
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
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": structural_schema(spec_model),
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
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
            EgressPolicySpec,
            "Egress rules for the pods of one namespace (selected by podSelector).",
        ),
        _crd(
            "ClusterEgressPolicy",
            "clusteregresspolicies",
            "cegp",
            "Cluster",
            ClusterEgressPolicySpec,
            "Egress rules for pods across namespaces (selected by namespaceSelector and podSelector).",
        ),
    ]
