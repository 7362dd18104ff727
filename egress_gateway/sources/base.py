"""The contract every policy source (files, Kubernetes) implements.

A source feeds a `PolicyStore` (per object or per group) and reports readiness and staleness. The data path never
talks to a source; it only reads the store's current `PolicySet` through the engine.
"""

from __future__ import annotations

from typing import Protocol


class PolicySource(Protocol):
    async def start(self) -> None:
        """Begin loading/watching in the background. Returns promptly; readiness is reported by `ready`."""

    async def stop(self) -> None:
        """Stop watching; the store keeps what it has."""

    @property
    def ready(self) -> bool:
        """True once the first full load succeeded (then it stays true; staleness tells the rest)."""

    def staleness_seconds(self) -> float | None:
        """Seconds since the last successful sync, or None before the first."""
