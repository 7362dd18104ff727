"""Error types of the policy core. Pure: no imports from the rest of the package."""

from __future__ import annotations

from dataclasses import dataclass


class InvalidName(ValueError):
    """A host name or host pattern that breaks the grammar."""


class InvalidTarget(ValueError):
    """A connection target (authority, port, IP literal) that cannot be normalized."""


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem in one policy object, located by a field path like `spec.rules[2].hosts[0]`."""

    field: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        return f"{text} (hint: {self.hint})" if self.hint else text


class PolicyValidationError(ValueError):
    """A policy object that failed validation; carries every problem found, not just the first."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))
