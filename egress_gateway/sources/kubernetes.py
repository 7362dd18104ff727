"""Policy source: EgressPolicy (all namespaces) and ClusterEgressPolicy objects from the Kubernetes API.

Owns: `KubernetesPolicySource(settings, store)`. One `Reflector` per kind lists and watches; every object is
validated with `validate_object` (the same validator as `lint`) and applied to the `PolicyStore` one object at
a time (`upsert`/`delete`; a full list or relist goes through `replace_group` in 16 slices plus deletes). An
invalid object never replaces its last valid version; one that was never valid contributes nothing. What was
decided about each generation goes to the `StatusWriter` (Accepted condition + observedGeneration), which only
the Lease holder runs. The store is marked loaded once both kinds are listed; after that the gateway stays
ready and keeps the last known policies whatever happens to the API server, exposing staleness instead.
Imports the policy core, the kube plumbing and audit metrics; never the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import zlib
from functools import partial
from typing import Any

import structlog
from kubernetes.aio.client import ApiClient, CustomObjectsApi

from egress_gateway import metrics
from egress_gateway.kube.client import connect
from egress_gateway.kube.leader import StatusLeaderElection
from egress_gateway.kube.reflector import Backoff, RawObject, Reflector, cancel_all, wait_synced, watch_backoff
from egress_gateway.kube.status import PLURALS, Acceptance, StatusWriter
from egress_gateway.policy.errors import PolicyValidationError
from egress_gateway.policy.model import API_GROUP, API_VERSION
from egress_gateway.policy.store import ObjectKey, PolicyStore, Versioned
from egress_gateway.policy.validation import validate_object
from egress_gateway.settings import Settings

KINDS = ("EgressPolicy", "ClusterEgressPolicy")
# A full list is published in this many store groups (by a stable hash of the object's key) and validated in steps
# of this many objects, yielding to the event loop in between: the proxy and /healthz stay served during a large load.
_SLICES = 16
_YIELD_EVERY = 200


def _slice_of(key: ObjectKey) -> int:
    return zlib.crc32("/".join(part or "" for part in key).encode()) % _SLICES


def _key(kind: str, raw: RawObject) -> ObjectKey:
    meta = raw.get("metadata") or {}
    namespace = meta.get("namespace") if kind == "EgressPolicy" else None
    return (kind, namespace, str(meta.get("name", "")))


def _version(raw: RawObject) -> str:
    generation = (raw.get("metadata") or {}).get("generation")
    if isinstance(generation, int):
        return str(generation)
    digest = hashlib.sha256(json.dumps(raw.get("spec"), sort_keys=True, default=str).encode()).hexdigest()
    return f"sha256:{digest[:12]}"


def _resource_version(raw: RawObject) -> str | None:
    version = (raw.get("metadata") or {}).get("resourceVersion")
    return str(version) if version else None


def _name(key: ObjectKey) -> str:
    kind, namespace, name = key
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


class KubernetesPolicySource:
    def __init__(self, settings: Settings, store: PolicyStore, log: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.log = log or structlog.get_logger("egress_gateway.sources.kubernetes")
        self.api: ApiClient | None = None
        self.reflectors: dict[str, Reflector] = {}
        self.status_writer: StatusWriter | None = None
        self.election: StatusLeaderElection | None = None
        self.invalid: dict[ObjectKey, str] = {}  # key -> problem, for objects whose latest generation is invalid
        self._reasons: dict[ObjectKey, str] = {}  # key -> condition reason for that problem
        self._good: dict[ObjectKey, Versioned] = {}  # last valid version of each object
        self._seen: dict[ObjectKey, str] = {}  # last generation looked at (valid or not)
        self._uids: dict[ObjectKey, str] = {}  # which object holds the name: generations are per uid
        self._known: dict[str, set[ObjectKey]] = {kind: set() for kind in KINDS}
        self._ready = False
        self._counts_changed = True
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- PolicySource
    @property
    def ready(self) -> bool:
        return self._ready

    def staleness_seconds(self) -> float | None:
        values = [r.staleness_seconds() for r in self.reflectors.values()]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    @property
    def watch_restarts(self) -> int:
        return sum(r.watch_restarts + r.relists for r in self.reflectors.values())

    @property
    def leader(self) -> bool:
        return self.election is not None and self.election.leader

    async def start(self) -> None:
        k = self.settings.kubernetes
        self.api = await connect(k)
        custom = CustomObjectsApi(self.api)
        backoff_cap = k.backoff_max_s
        for kind in KINDS:
            call = partial(
                custom.list_cluster_custom_object_without_preload_content,
                API_GROUP,
                API_VERSION,
                PLURALS[kind],
            )
            self.reflectors[kind] = Reflector(
                kind,
                call,
                on_replace=partial(self._on_replace, kind),
                on_event=partial(self._on_event, kind),
                watch_timeout_s=k.watch_timeout_s,
                backoff=watch_backoff(backoff_cap),
                on_restart=partial(metrics.watch_restarted, kind),
            )
        self._tasks = [asyncio.create_task(r.run(), name=f"kube-watch-{kind}") for kind, r in self.reflectors.items()]
        metrics.track_source("kubernetes", self.staleness_seconds, lambda: self.ready)
        if k.write_status:
            writer = StatusWriter(custom, backoff=Backoff(base_s=0.5, cap_s=backoff_cap))
            self.status_writer = writer
            self.election = StatusLeaderElection(self.api, k, writer.set_leader)
            self._tasks.append(asyncio.create_task(writer.run(), name="kube-status-writer"))
            self._tasks.append(asyncio.create_task(self.election.run(), name="kube-leader-election"))
        self.log.info("kube_policy_source_started", write_status=k.write_status)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks = []
        if self.api is not None:
            await self.api.close()
            self.api = None

    async def wait_ready(self, timeout: float) -> bool:
        """For tools and tests: wait until both kinds are listed (or the timeout passes)."""
        await wait_synced(self.reflectors.values(), timeout)
        return self._ready

    # ---------------------------------------------------------------- handlers (run on the event loop)
    async def _on_replace(self, kind: str, items: list[RawObject]) -> None:
        """A full list: reconcile, validate what changed, publish in slices so the proxy keeps being served."""
        listed = {_key(kind, raw): raw for raw in items}
        with self.store.batch():
            for key in self._known[kind] - listed.keys():
                self._forget(key)
            for key, raw in listed.items():
                self._adopt(key, raw)
        previous: dict[ObjectKey, Versioned | None] = {}
        for index, (key, raw) in enumerate(listed.items()):
            before = self._good.get(key)
            if self._evaluate(key, raw):
                previous[key] = before
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
        self._known[kind] = set(listed)
        slices: list[list[Versioned]] = [[] for _ in range(_SLICES)]
        for key in listed:
            good = self._good.get(key)
            if good is not None:
                slices[_slice_of(key)].append(good)
        for number, batch in enumerate(slices):
            try:
                self.store.replace_group(f"kubernetes/{kind}/{number}", batch)
            except Exception:
                # One object the validator passed but the engine cannot compile must not block the others.
                for item in batch:
                    key = (kind, item.policy.metadata.namespace, item.policy.metadata.name)
                    self._upsert_or_reject(key, item, previous.get(key), listed[key])
            await asyncio.sleep(0)
        self._report_counts(kind)
        if not self._ready and all(r.synced or r.name == kind for r in self.reflectors.values()):
            self._ready = True
            self.store.mark_loaded()
            self.log.info("kube_policies_loaded", policies=len(self._good), invalid=len(self.invalid))

    def _on_event(self, kind: str, event: str, raw: RawObject) -> None:
        key = _key(kind, raw)
        if event == "DELETED":
            self._known[kind].discard(key)
            self._forget(key)
        else:
            self._known[kind].add(key)
            self._adopt(key, raw)
            before = self._good.get(key)
            if self._evaluate(key, raw):
                self._upsert_or_reject(key, self._good[key], before, raw)
        self._report_counts(kind)

    def _upsert_or_reject(self, key: ObjectKey, good: Versioned, before: Versioned | None, raw: RawObject) -> None:
        try:
            self.store.upsert(good.policy, good.version)
        except Exception as exc:
            # A bug in compilation would otherwise fail this event forever and stall the watch behind it.
            self.log.error("policy_apply_failed", policy=_name(key), error=f"{type(exc).__name__}: {exc}")
            if before is None:
                self._good.pop(key, None)
            else:
                self._good[key] = before
            self.invalid[key] = f"the gateway could not compile this generation ({type(exc).__name__}: {exc})"
            self._reasons[key] = "CompileFailed"
            if self.status_writer is not None:
                generation = (raw.get("metadata") or {}).get("generation")
                self.status_writer.observe(
                    key, raw.get("status"), self._acceptance(key, generation), _resource_version(raw)
                )

    def _evaluate(self, key: ObjectKey, raw: RawObject) -> bool:
        """Validate one object if its generation is new. True when a new valid version must go to the store."""
        version = _version(raw)
        generation = (raw.get("metadata") or {}).get("generation")
        changed = False
        if self._seen.get(key) != version:
            self._seen[key] = version
            self._counts_changed = True
            try:
                policy = validate_object(raw)
            except PolicyValidationError as exc:
                self.invalid[key] = "; ".join(str(e) for e in exc.errors)
                self._reasons[key] = "InvalidSpec"
                kept = self._good.get(key)
                self.log.error(
                    "policy_rejected",
                    policy=_name(key),
                    generation=generation,
                    errors=[str(e) for e in exc.errors],
                    kept_version=kept.version if kept else None,
                )
            else:
                self.invalid.pop(key, None)
                self._reasons.pop(key, None)
                self._good[key] = Versioned(policy, version)
                changed = True
        if self.status_writer is not None:
            self.status_writer.observe(
                key, raw.get("status"), self._acceptance(key, generation), _resource_version(raw)
            )
        return changed

    def _acceptance(self, key: ObjectKey, generation: Any) -> Acceptance:
        gen = generation if isinstance(generation, int) else None
        problem = self.invalid.get(key)
        kept = self._good.get(key)
        rules = len(kept.policy.spec.rules) if kept else 0
        if problem is None:
            return Acceptance(True, "Valid", "policy is valid and in force", gen, rules)
        tail = (
            f" (generation {kept.version}, the last valid one, stays in force)"
            if kept
            else " (nothing from this policy is in force)"
        )
        return Acceptance(False, self._reasons.get(key, "InvalidSpec"), problem + tail, gen, rules)

    def _adopt(self, key: ObjectKey, raw: RawObject) -> None:
        """Identity is the uid, not the name: generations count per object, so a different object under a known name
        (deleted and re-created while the watch was away, seen only in a relist) replaces the old one entirely.
        Nothing of the old one stays in force, counts as its last good version, or decides its status."""
        uid = str((raw.get("metadata") or {}).get("uid") or "")
        known = self._uids.get(key)
        if known is not None and known != uid:
            self.log.info("policy_replaced", policy=_name(key), old_uid=known, uid=uid)
            self._forget(key)
        self._uids[key] = uid

    def _forget(self, key: ObjectKey) -> None:
        self._counts_changed = True
        self._uids.pop(key, None)
        self._seen.pop(key, None)
        self.invalid.pop(key, None)
        self._reasons.pop(key, None)
        if self.status_writer is not None:
            self.status_writer.forget(key)
        if self._good.pop(key, None) is not None:
            self.store.delete(key)
            self.log.info("policy_removed", policy=_name(key))

    def _report_counts(self, kind: str) -> None:
        if not self._counts_changed:
            return
        self._counts_changed = False
        loaded = sum(1 for k in self._good if k[0] == kind)
        invalid = sum(1 for k in self.invalid if k[0] == kind)
        metrics.set_policy_counts(kind, loaded=loaded, invalid=invalid)
