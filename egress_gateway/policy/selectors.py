"""Kubernetes LabelSelector semantics (matchLabels AND every matchExpression), compiled once per policy.

An omitted or empty selector selects everything. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from egress_gateway.policy.model import LabelSelector, LabelSelectorOperator


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: LabelSelectorOperator
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        match self.operator:
            case LabelSelectorOperator.IN:
                return self.key in labels and labels[self.key] in self.values
            case LabelSelectorOperator.NOT_IN:
                return self.key not in labels or labels[self.key] not in self.values
            case LabelSelectorOperator.EXISTS:
                return self.key in labels
            case LabelSelectorOperator.DOES_NOT_EXIST:
                return self.key not in labels
        return False


@dataclass(frozen=True, slots=True)
class Selector:
    labels: tuple[tuple[str, str], ...] = ()
    requirements: tuple[Requirement, ...] = ()

    @property
    def selects_all(self) -> bool:
        return not self.labels and not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        return all(req.matches(labels) for req in self.requirements)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.labels]
        for req in self.requirements:
            values = ",".join(sorted(req.values))
            parts.append(f"{req.key} {req.operator} ({values})" if values else f"{req.key} {req.operator}")
        return ", ".join(parts) or "(all)"


SELECT_ALL = Selector()


def compile_selector(selector: LabelSelector | None) -> Selector:
    if selector is None:
        return SELECT_ALL
    labels = tuple(sorted((selector.match_labels or {}).items()))
    requirements = tuple(
        Requirement(expr.key, expr.operator, frozenset(expr.values or ())) for expr in selector.match_expressions or ()
    )
    return Selector(labels, requirements)
