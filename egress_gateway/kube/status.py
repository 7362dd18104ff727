"""Writing `status.conditions[type=Accepted]` and `status.observedGeneration` on policy objects.

Owns: `Acceptance` (what the gateway thinks of one generation of one object) and `StatusWriter`, which
compares it with the status the object already carries (as last seen by the watch) and patches the status
subresource (`application/merge-patch+json`) only when they differ, and only while this replica is the leader.
Each patch carries the resourceVersion the watch saw, so it lands only on exactly that version of that object:
never on a newer spec, and never on a different object re-created under the same name (409 Conflict; the watch
then brings the current object and its own verdict). Writes are serialized, retried with backoff, and dropped
when the object is gone. Imports no policy engine code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from kubernetes.aio.client import CustomObjectsApi
from kubernetes.aio.client.exceptions import ApiException

from egress_gateway.kube.reflector import Backoff
from egress_gateway.policy.model import API_GROUP, API_VERSION

ObjectKey = tuple[str, str | None, str]  # (kind, namespace, name), as in policy.store
PLURALS = {"EgressPolicy": "egresspolicies", "ClusterEgressPolicy": "clusteregresspolicies"}
_MAX_MESSAGE = 1024


@dataclass(frozen=True, slots=True)
class Acceptance:
    accepted: bool
    reason: str  # CamelCase, per API conventions: "Valid", "InvalidSpec", "CompileFailed"
    message: str
    generation: int | None
    rules: int = 0  # rules in force from this object (its last valid generation)

    @property
    def status(self) -> str:
        return "True" if self.accepted else "False"


def _accepted_condition(status: dict[str, Any] | None) -> dict[str, Any] | None:
    for condition in (status or {}).get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == "Accepted":
            return condition
    return None


def needs_write(current: dict[str, Any] | None, wanted: Acceptance) -> bool:
    condition = _accepted_condition(current)
    if condition is None:
        return True
    return (
        (current or {}).get("observedGeneration") != wanted.generation
        or (current or {}).get("rules") != wanted.rules
        or condition.get("status") != wanted.status
        or condition.get("reason") != wanted.reason
        or condition.get("message") != wanted.message[:_MAX_MESSAGE]
        or condition.get("observedGeneration") != wanted.generation
    )


def status_patch(current: dict[str, Any] | None, wanted: Acceptance, now: datetime | None = None) -> dict[str, Any]:
    previous = _accepted_condition(current)
    if previous is not None and previous.get("status") == wanted.status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    else:
        transition = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    others = [c for c in (current or {}).get("conditions") or [] if isinstance(c, dict) and c.get("type") != "Accepted"]
    condition = {
        "type": "Accepted",
        "status": wanted.status,
        "reason": wanted.reason,
        "message": wanted.message[:_MAX_MESSAGE],
        "observedGeneration": wanted.generation,
        "lastTransitionTime": transition,
    }
    return {
        "status": {"observedGeneration": wanted.generation, "rules": wanted.rules, "conditions": [*others, condition]}
    }


class StatusWriter:
    def __init__(self, api: CustomObjectsApi, *, backoff: Backoff | None = None) -> None:
        self._api = api
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        self._wanted: dict[ObjectKey, Acceptance] = {}
        self._current: dict[ObjectKey, dict[str, Any] | None] = {}
        self._versions: dict[ObjectKey, str | None] = {}  # resourceVersion the verdict was made for
        self._dirty: set[ObjectKey] = set()
        self._wake = asyncio.Event()
        self._log = structlog.get_logger("egress_gateway.kube")
        self.leader = False
        self.writes = 0
        self.on_write: Callable[[ObjectKey, Acceptance], None] | None = None

    def observe(
        self,
        key: ObjectKey,
        current_status: dict[str, Any] | None,
        wanted: Acceptance,
        resource_version: str | None = None,
    ) -> None:
        """The object as the watch saw it (its status and resourceVersion), and what its Accepted condition should
        say."""
        self._wanted[key] = wanted
        self._current[key] = current_status
        self._versions[key] = resource_version
        if needs_write(current_status, wanted):
            self._dirty.add(key)
            self._wake.set()
        else:
            self._dirty.discard(key)

    def forget(self, key: ObjectKey) -> None:
        self._wanted.pop(key, None)
        self._current.pop(key, None)
        self._versions.pop(key, None)
        self._dirty.discard(key)

    def set_leader(self, leader: bool) -> None:
        self.leader = leader
        if leader:
            self._dirty = {k for k, w in self._wanted.items() if needs_write(self._current.get(k), w)}
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._dirty)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.leader and self._dirty:
                key = min(self._dirty)
                self._dirty.discard(key)
                wanted = self._wanted.get(key)
                if wanted is None or not needs_write(self._current.get(key), wanted):
                    continue
                try:
                    await self._write(key, wanted)
                    self._backoff.reset()
                except asyncio.CancelledError:
                    raise
                except ApiException as exc:
                    if exc.status == 404:
                        continue  # deleted meanwhile; the watch will tell us
                    if exc.status == 409:
                        # Changed (or deleted and re-created) since the watch saw it: the watch brings the new
                        # version, which is judged and observed afresh.
                        self._log.info("kube_status_write_stale", object="/".join(p for p in key if p))
                        continue
                    await self._retry_later(key, f"HTTP {exc.status}: {exc.reason}")
                except Exception as exc:
                    await self._retry_later(key, f"{type(exc).__name__}: {exc}")

    async def _retry_later(self, key: ObjectKey, error: str) -> None:
        delay = self._backoff.next_delay()
        self._log.warning(
            "kube_status_write_failed",
            object="/".join(p for p in key if p),
            error=error,
            retry_in_s=round(delay, 3),
        )
        if key in self._wanted:
            self._dirty.add(key)
        await asyncio.sleep(delay)

    async def _write(self, key: ObjectKey, wanted: Acceptance) -> None:
        kind, namespace, name = key
        body = status_patch(self._current.get(key), wanted)
        version = self._versions.get(key)
        if version:
            body["metadata"] = {"resourceVersion": version}
        if namespace is None:
            result = await self._api.patch_cluster_custom_object_status(
                API_GROUP,
                API_VERSION,
                PLURALS[kind],
                name,
                body,
                _content_type="application/merge-patch+json",
            )
        else:
            result = await self._api.patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                namespace,
                PLURALS[kind],
                name,
                body,
                _content_type="application/merge-patch+json",
            )
        self.writes += 1
        if isinstance(result, dict) and key in self._wanted:
            self._current[key] = result.get("status")
            self._versions[key] = (result.get("metadata") or {}).get("resourceVersion") or version
        self._log.info(
            "kube_status_written",
            object="/".join(p for p in key if p),
            accepted=wanted.accepted,
            generation=wanted.generation,
        )
        if self.on_write is not None:
            self.on_write(key, wanted)
