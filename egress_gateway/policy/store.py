"""The set of policies in force, kept per object with last-known-good semantics.

Owns: `PolicyStore`, which sources (files, Kubernetes) feed per object or per group (a file's objects replaced
atomically), and which hands a new immutable `PolicySet` to subscribers after every change. Only the changed object
is recompiled. Pure: no I/O; callers serialize calls (one event loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from egress_gateway.policy.engine import CompiledPolicy, PolicySet, compile_policy
from egress_gateway.policy.model import PolicyObject

ObjectKey = tuple[str, str | None, str]  # (kind, namespace or None, name)


def object_key(policy: PolicyObject) -> ObjectKey:
    return (policy.kind, policy.metadata.namespace, policy.metadata.name)


@dataclass(frozen=True, slots=True)
class Versioned:
    policy: PolicyObject
    version: str  # metadata.generation for Kubernetes objects, a content hash for files


class PolicyStore:
    def __init__(self) -> None:
        self._compiled: dict[ObjectKey, CompiledPolicy] = {}
        self._groups: dict[str, set[ObjectKey]] = {}
        self._subscribers: list[Callable[[PolicySet], None]] = []
        self._current = PolicySet.build(())
        self.loaded = False  # set by a source once its first full load finished
        self._batch_depth = 0
        self._dirty = False

    @property
    def current(self) -> PolicySet:
        return self._current

    def subscribe(self, callback: Callable[[PolicySet], None]) -> None:
        self._subscribers.append(callback)

    def keys(self) -> set[ObjectKey]:
        return set(self._compiled)

    def get(self, key: ObjectKey) -> CompiledPolicy | None:
        return self._compiled.get(key)

    def upsert(self, policy: PolicyObject, version: str) -> None:
        """Put one valid object in force (replacing its previous version)."""
        key = object_key(policy)
        existing = self._compiled.get(key)
        if existing is not None and existing.ref.version == version and existing.source is policy:
            return
        self._compiled[key] = compile_policy(policy, version)
        self._publish()

    def delete(self, key: ObjectKey) -> None:
        if self._compiled.pop(key, None) is not None:
            self._publish()

    def replace_group(self, group: str, policies: Iterable[Versioned]) -> None:
        """Atomically replace every object that came from `group` (e.g. one file) with `policies`."""
        new_keys: set[ObjectKey] = set()
        for item in policies:
            key = object_key(item.policy)
            new_keys.add(key)
            current = self._compiled.get(key)
            if current is None or current.ref.version != item.version:
                self._compiled[key] = compile_policy(item.policy, item.version)
        for stale in self._groups.get(group, set()) - new_keys:
            if not any(stale in keys for g, keys in self._groups.items() if g != group):
                self._compiled.pop(stale, None)
        if new_keys:
            self._groups[group] = new_keys
        else:
            self._groups.pop(group, None)
        self._publish()

    def group_keys(self, group: str) -> set[ObjectKey]:
        return set(self._groups.get(group, set()))

    def mark_loaded(self) -> None:
        self.loaded = True
        self._publish()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Apply several changes and publish one new PolicySet at the end (e.g. a directory rescan)."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0 and self._dirty:
                self._publish()

    def _publish(self) -> None:
        if self._batch_depth:
            self._dirty = True
            return
        self._dirty = False
        self._current = PolicySet.build(self._compiled.values(), previous=self._current)
        for callback in self._subscribers:
            callback(self._current)
