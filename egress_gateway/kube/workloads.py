"""The cluster's workloads as the identity resolvers need them: pods by IP and by name, namespaces' labels.

Owns: `WorkloadIndex`, fed by reflectors (Pods in all namespaces with a server-side field selector that drops
finished pods, Namespaces, and ServiceAccounts when token identity is configured). It keeps only what identity
needs (name, UID, labels, service account, IPs, phase, start time; a ServiceAccount's UID and Secret names) and
indexes every pod IP (`status.podIPs`). Pods on the host network are ignored (their IP is the node's). When an IP
is claimed by several live pods (reuse during churn, a ghost pod on a lost node), the most recent claim owns it
(a terminating pod loses to one that is not): the conflict is logged and counted. The UIDs of pods and
ServiceAccounts seen to go away are remembered (bounded), so a token bound to one can be refused locally.
A namespace's `kubernetes.io/metadata.name` label is always its real name, whatever label is stored. Pod-IP
identities are trusted only while the index is at most `max_staleness_s` out of touch with the API server
(`addresses_trusted()`; the transition is logged and exported as a gauge).
`WorkloadIndex.shared(settings)` hands the pod-IP and token resolvers one index (one set of watches).
Identities it hands out are `ClusterIdentity`s. `subscribe(callback)` tells the gateway which of them changed
(pod labels, service account or IPs, pod gone, namespace labels), coalesced: at most one call per
`NOTIFY_INTERVAL_S`, so a busy cluster costs a bounded number of passes over the open tunnels.
Imports the decision types, settings, the kube plumbing and audit metrics; never the proxy or the engine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, ClassVar

import structlog
from kubernetes.aio.client import ApiClient, CoreV1Api

from egress_gateway import metrics
from egress_gateway.kube.client import connect
from egress_gateway.kube.reflector import RawObject, Reflector, cancel_all, wait_synced, watch_backoff
from egress_gateway.policy.decision import Identity
from egress_gateway.policy.model import NAMESPACE_NAME_LABEL
from egress_gateway.settings import KubernetesSettings, Settings

PodKey = tuple[str, str]  # (namespace, name)
# Finished pods never own an address again; let the API server drop them (and send DELETED when a pod finishes).
POD_FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"
_EMPTY: Mapping[str, str] = MappingProxyType({})
# Identity changes are handed to subscribers at most this often. The first change after a quiet period goes out on
# the next loop iteration (a lone relabel is acted on at once); changes arriving within this interval of the last
# notification are gathered into one, so a rollout of thousands of pods costs at most 1/interval passes per second
# over the open tunnels, and a relabel waits at most this long.
NOTIFY_INTERVAL_S = 0.5
# UIDs of pods and ServiceAccounts seen to go away, remembered for refusing their tokens locally. A UID is never
# reused, so an old entry stays true; the bound only caps memory (beyond it the API server's own check applies).
GONE_UIDS_REMEMBERED = 100_000
STALENESS_CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class ClusterIdentity(Identity):
    """An `Identity` read from this index (pod-IP or token identity): its pod or namespace labels can change, or
    its pod can go away, while a tunnel it opened is still open. Static identities are plain `Identity`s."""


@dataclass(frozen=True, slots=True)
class IdentityChanges:
    """What changed since the last notification: pods whose identity-relevant data changed (added, relabelled,
    other IPs or service account, removed) and namespaces whose labels changed."""

    index: WorkloadIndex
    pods: frozenset[PodKey] = field(default_factory=frozenset)
    namespaces: frozenset[str] = field(default_factory=frozenset)

    def affects(self, identity: Identity) -> bool:
        return (
            isinstance(identity, ClusterIdentity)
            and identity.pod is not None
            and (identity.namespace in self.namespaces or (identity.namespace, identity.pod) in self.pods)
        )

    def refresh(self, identity: Identity) -> Identity | None:
        """The current identity of the pod behind `identity` (the same object when nothing about it changed or it
        did not come from the cluster); None when its pod is gone."""
        if not self.affects(identity) or identity.pod is None:  # (pod: for the type checker; affects() says so)
            return identity
        current = self.index.identity_for_pod(identity.namespace, identity.pod)
        return identity if current == identity else current


def canonical_ip(text: str) -> str | None:
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True, slots=True)
class PodRecord:
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    service_account: str | None
    ips: tuple[str, ...]
    running: bool
    terminating: bool
    created: str  # RFC 3339, sorts chronologically

    def identity_data(self) -> tuple[Mapping[str, str], str | None, tuple[str, ...]]:
        """What an identity (or the address that leads to it) is made of: a change is reported to subscribers."""
        return (self.labels, self.service_account, self.ips)


@dataclass(frozen=True, slots=True)
class ServiceAccountRecord:
    uid: str
    secrets: frozenset[str]  # names in `secrets` (legacy token Secrets are listed here on the servers that use them)


class _GoneUids:
    def __init__(self, limit: int = GONE_UIDS_REMEMBERED) -> None:
        self._uids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, uid: str) -> None:
        if uid:
            self._uids[uid] = None
            self._uids.move_to_end(uid)
            while len(self._uids) > self._limit:
                self._uids.popitem(last=False)

    def __contains__(self, uid: object) -> bool:
        return uid in self._uids


def pod_record(raw: RawObject) -> PodRecord | None:
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    if spec.get("hostNetwork"):
        return None
    ips = [entry.get("ip", "") for entry in status.get("podIPs") or [] if isinstance(entry, dict)]
    if status.get("podIP"):
        ips.append(status["podIP"])
    canonical = tuple(dict.fromkeys(ip for ip in (canonical_ip(i) for i in ips if i) if ip))
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed"):
        return None
    return PodRecord(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        labels=MappingProxyType(dict(meta.get("labels") or {})),
        service_account=spec.get("serviceAccountName"),
        ips=canonical,
        running=phase == "Running",
        terminating=bool(meta.get("deletionTimestamp")),
        created=str(meta.get("creationTimestamp") or ""),
    )


class WorkloadIndex:
    _shared: ClassVar[dict[int, tuple[Settings, WorkloadIndex]]] = {}

    def __init__(
        self,
        settings: KubernetesSettings,
        api: ApiClient | None = None,
        *,
        max_staleness_s: float | None = None,
        watch_service_accounts: bool = False,
    ) -> None:
        self.settings = settings
        self.max_staleness_s = max_staleness_s
        self.watch_service_accounts = watch_service_accounts
        self._api = api
        self._own_api = api is None
        self._log = structlog.get_logger("egress_gateway.kube.workloads")
        self._pods: dict[PodKey, PodRecord] = {}
        self._claims: dict[str, set[PodKey]] = {}  # ip -> pods that list it
        self._claim_order: dict[tuple[str, PodKey], int] = {}  # (ip, pod) -> when the pod started listing it
        self._claim_counter = itertools.count()
        self._gone_pods = _GoneUids()
        self._service_accounts: dict[PodKey, ServiceAccountRecord] = {}
        self._gone_service_accounts = _GoneUids()
        self._trusted = False
        self._ever_trusted = False
        self._owner: dict[str, PodKey] = {}  # ip -> the pod that owns it
        self._namespaces: dict[str, Mapping[str, str]] = {}
        self._identities: dict[PodKey, Identity] = {}
        self.reflectors: dict[str, Reflector] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._users = 0
        self._subscribers: list[Callable[[IdentityChanges], None]] = []
        self._changed_pods: set[PodKey] = set()
        self._changed_namespaces: set[str] = set()
        self._notify_handle: asyncio.Handle | None = None
        self._last_notified = -NOTIFY_INTERVAL_S

    @classmethod
    def shared(cls, settings: Settings) -> WorkloadIndex:
        """One index per Settings object, shared by the resolvers built from it."""
        entry = cls._shared.get(id(settings))
        if entry is None or entry[0] is not settings:
            entry = (
                settings,
                cls(
                    settings.kubernetes,
                    max_staleness_s=settings.identity.max_staleness_s,
                    watch_service_accounts="service-account-token" in settings.identity.mode,
                ),
            )
            cls._shared[id(settings)] = entry
        return entry[1]

    # ---------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return bool(self.reflectors) and all(r.synced for r in self.reflectors.values())

    async def start(self) -> None:
        self._users += 1
        if self._tasks:
            return
        if self._api is None:
            self._api = await connect(self.settings)
        core = CoreV1Api(self._api)
        backoff_cap = self.settings.backoff_max_s
        self.reflectors = {
            "Pod": Reflector(
                "Pod",
                core.list_pod_for_all_namespaces_without_preload_content,
                on_replace=self._replace_pods,
                on_event=self._pod_event,
                watch_timeout_s=self.settings.watch_timeout_s,
                backoff=watch_backoff(backoff_cap),
                selectors={"field_selector": POD_FIELD_SELECTOR},
                on_restart=partial(metrics.watch_restarted, "Pod"),
            ),
            "Namespace": Reflector(
                "Namespace",
                core.list_namespace_without_preload_content,
                on_replace=self._replace_namespaces,
                on_event=self._namespace_event,
                watch_timeout_s=self.settings.watch_timeout_s,
                backoff=watch_backoff(backoff_cap),
                on_restart=partial(metrics.watch_restarted, "Namespace"),
            ),
        }
        if self.watch_service_accounts:
            self.reflectors["ServiceAccount"] = Reflector(
                "ServiceAccount",
                core.list_service_account_for_all_namespaces_without_preload_content,
                on_replace=self._replace_service_accounts,
                on_event=self._service_account_event,
                watch_timeout_s=self.settings.watch_timeout_s,
                backoff=watch_backoff(backoff_cap),
                on_restart=partial(metrics.watch_restarted, "ServiceAccount"),
            )
        # A stale pod index can attribute a reused IP to the pod that had it before: make that visible.
        metrics.track_source("kubernetes-workloads", self.staleness_seconds, lambda: self.ready)
        metrics.pod_ip_identity_trusted(False)
        self._tasks = [asyncio.create_task(r.run(), name=f"kube-watch-{n}") for n, r in self.reflectors.items()]
        if self.max_staleness_s is not None:
            # The transition is logged and exported when it happens, not at the next client's lookup.
            self._tasks.append(asyncio.create_task(self._check_staleness(), name="kube-workloads-staleness"))

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users:
            return
        await cancel_all(self._tasks)
        self._tasks = []
        if self._notify_handle is not None:
            self._notify_handle.cancel()
            self._notify_handle = None
        if self._api is not None and self._own_api:
            await self._api.close()
            self._api = None

    async def wait_ready(self, timeout: float) -> bool:
        await wait_synced(self.reflectors.values(), timeout)
        return self.ready

    def staleness_seconds(self) -> float | None:
        values = [r.staleness_seconds() for r in self.reflectors.values()]
        if not values or any(v is None for v in values):
            return None
        return max(v for v in values if v is not None)

    def addresses_trusted(self) -> bool:
        """True while the index is synced and has been out of touch with the API server for at most
        `max_staleness_s`: past that, an address may have moved to another pod without the index knowing."""
        staleness = self.staleness_seconds()
        trusted = staleness is not None and (self.max_staleness_s is None or staleness <= self.max_staleness_s)
        if trusted != self._trusted:
            self._trusted = trusted
            metrics.pod_ip_identity_trusted(trusted)
            if not trusted:
                self._log.warning(
                    "pod_ip_identities_untrusted",
                    staleness_s=None if staleness is None else round(staleness, 3),
                    max_staleness_s=self.max_staleness_s,
                    effect="pod-IP clients are unknown_client until the index is back in touch",
                )
            elif self._ever_trusted:
                self._log.info("pod_ip_identities_trusted_again", max_staleness_s=self.max_staleness_s)
            self._ever_trusted = self._ever_trusted or trusted
        return trusted

    def untrusted_reason(self) -> str:
        staleness = self.staleness_seconds()
        if staleness is None:
            return "the pod index has not been listed yet"
        return (
            f"the pod index has been out of touch with the API server for {staleness:.0f} s "
            f"(identity.max_staleness_s is {self.max_staleness_s:g}): the address may belong to another pod now"
        )

    async def _check_staleness(self) -> None:
        interval = min(STALENESS_CHECK_INTERVAL_S, (self.max_staleness_s or STALENESS_CHECK_INTERVAL_S) / 4)
        while True:
            self.addresses_trusted()
            await asyncio.sleep(interval)

    # ---------------------------------------------------------------- change notifications
    def subscribe(self, callback: Callable[[IdentityChanges], None]) -> None:
        """`callback(changes)` runs on the event loop after identities changed, at most once per
        `NOTIFY_INTERVAL_S`. Changes that matter to no identity (pod status, phase, readiness) are not reported."""
        self._subscribers.append(callback)

    def _changed(self, pod: PodKey | None = None, namespace: str | None = None) -> None:
        if not self._subscribers:
            return
        if pod is not None:
            self._changed_pods.add(pod)
        if namespace is not None:
            self._changed_namespaces.add(namespace)
        if self._notify_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): `flush_changes()` hands them out
            return
        wait = self._last_notified + NOTIFY_INTERVAL_S - time.monotonic()
        self._notify_handle = (
            loop.call_later(wait, self.flush_changes) if wait > 0 else loop.call_soon(self.flush_changes)
        )

    def flush_changes(self) -> None:
        """Hand the pending changes to the subscribers now (one call each)."""
        self._notify_handle = None
        if not self._changed_pods and not self._changed_namespaces:
            return
        changes = IdentityChanges(self, frozenset(self._changed_pods), frozenset(self._changed_namespaces))
        self._changed_pods.clear()
        self._changed_namespaces.clear()
        self._last_notified = time.monotonic()
        for callback in list(self._subscribers):
            try:
                callback(changes)
            except Exception:  # one subscriber's bug must not stop the others or the watch
                self._log.exception("identity_change_subscriber_failed")

    # ---------------------------------------------------------------- lookups (data path: dict reads only)
    def owner_of(self, ip: str) -> PodRecord | None:
        canonical = canonical_ip(ip)
        key = self._owner.get(canonical) if canonical else None
        return self._pods.get(key) if key else None

    def pod(self, namespace: str, name: str) -> PodRecord | None:
        return self._pods.get((namespace, name))

    def pod_gone(self, uid: str) -> bool:
        """The pod with this UID was seen deleted or finished (UIDs are never reused)."""
        return uid in self._gone_pods

    def service_account(self, namespace: str, name: str) -> ServiceAccountRecord | None:
        return self._service_accounts.get((namespace, name))

    def service_account_gone(self, uid: str) -> bool:
        return uid in self._gone_service_accounts

    def identity_for_ip(self, ip: str) -> Identity | None:
        canonical = canonical_ip(ip)
        key = self._owner.get(canonical) if canonical else None
        return self.identity_for_pod(*key) if key else None

    def identity_for_pod(self, namespace: str, name: str) -> Identity | None:
        key = (namespace, name)
        identity = self._identities.get(key)
        if identity is not None:
            return identity
        record = self._pods.get(key)
        if record is None:
            return None
        identity = ClusterIdentity(
            namespace=namespace,
            pod=name,
            labels=record.labels,
            namespace_labels=self.namespace_labels(namespace),
            service_account=record.service_account,
            pod_uid=record.uid or None,
        )
        self._identities[key] = identity
        return identity

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        labels = self._namespaces.get(namespace)
        if labels is None:
            return MappingProxyType({NAMESPACE_NAME_LABEL: namespace})
        return labels

    # ---------------------------------------------------------------- pods
    def _replace_pods(self, items: list[RawObject]) -> None:
        listed: dict[PodKey, RawObject] = {}
        for raw in items:
            meta = raw.get("metadata") or {}
            listed[(str(meta.get("namespace", "")), str(meta.get("name", "")))] = raw
        for key in set(self._pods) - set(listed):
            self._remove_pod(key)
        # Claims first seen in one list are ordered by when their pods started (the list does not say when each
        # pod took its address; a pod that started later took it later).
        for key, raw in sorted(listed.items(), key=lambda item: _start_time(item[1])):
            self._upsert_pod(key, raw)
        self._log.info("kube_pods_indexed", pods=len(self._pods), addresses=len(self._owner))

    def _pod_event(self, event: str, raw: RawObject) -> None:
        meta = raw.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if event == "DELETED":
            self._remove_pod(key)
        else:
            self._upsert_pod(key, raw)

    def _upsert_pod(self, key: PodKey, raw: RawObject) -> None:
        old = self._pods.get(key)
        record = pod_record(raw)
        if record is None:
            self._remove_pod(key)
            return
        if old == record:
            return
        if old is not None and old.uid != record.uid:  # deleted and re-created between two lists
            self._remove_pod(key)
            old = None
        self._pods[key] = record
        self._identities.pop(key, None)
        if old is None or old.identity_data() != record.identity_data():
            self._changed(pod=key)  # not for status-only updates (phase, readiness, deletion mark)
        touched = set(record.ips) | set(old.ips if old else ())
        for ip in set(old.ips if old else ()) - set(record.ips):
            self._claims.get(ip, set()).discard(key)
            self._claim_order.pop((ip, key), None)
        for ip in record.ips:
            claimants = self._claims.setdefault(ip, set())
            if key not in claimants:
                self._claim_order[(ip, key)] = next(self._claim_counter)
                if claimants:
                    self._conflict(ip, key, claimants)
                claimants.add(key)
        self._elect(touched)

    def _conflict(self, ip: str, claimant: PodKey, others: set[PodKey]) -> None:
        metrics.pod_ip_conflict()
        self._log.warning(
            "kube_pod_ip_conflict",
            ip=ip,
            pod=f"{claimant[0]}/{claimant[1]}",
            also_claimed_by=sorted(f"{ns}/{name}" for ns, name in others)[:5],
            claimants=len(others) + 1,
            owner="the most recent claim (a pod that is not terminating before one that is)",
        )

    def _remove_pod(self, key: PodKey) -> None:
        old = self._pods.pop(key, None)
        self._identities.pop(key, None)
        if old is None:
            return
        self._gone_pods.add(old.uid)
        self._changed(pod=key)
        for ip in old.ips:
            self._claims.get(ip, set()).discard(key)
            self._claim_order.pop((ip, key), None)
        self._elect(set(old.ips))

    def _elect(self, ips: set[str]) -> None:
        for ip in ips:
            claimants = self._claims.get(ip)
            if not claimants:
                self._claims.pop(ip, None)
                self._owner.pop(ip, None)
                continue
            # A pod that lists an IP is using it (a Pending pod's init containers already are). The CNI hands an
            # IP to a new pod only after the old sandbox is gone, so the most recent claim is the one that holds
            # it now; an older claimant is a pod whose deletion or node loss the index has not seen yet.
            winner = max(claimants, key=lambda k: (not self._pods[k].terminating, self._claim_order.get((ip, k), -1)))
            if self._owner.get(ip) != winner:
                self._owner[ip] = winner
                if len(claimants) > 1:
                    self._log.info(
                        "kube_pod_ip_reassigned", ip=ip, pod=f"{winner[0]}/{winner[1]}", claimants=len(claimants)
                    )

    # ---------------------------------------------------------------- namespaces
    def _replace_namespaces(self, items: list[RawObject]) -> None:
        listed = {str((raw.get("metadata") or {}).get("name", "")): raw for raw in items}
        for name in set(self._namespaces) - set(listed):
            self._set_namespace(name, None)
        for name, raw in listed.items():
            self._set_namespace(name, raw)

    def _namespace_event(self, event: str, raw: RawObject) -> None:
        name = str((raw.get("metadata") or {}).get("name", ""))
        self._set_namespace(name, None if event == "DELETED" else raw)

    def _set_namespace(self, name: str, raw: RawObject | None) -> None:
        if raw is None:
            labels: Mapping[str, str] | None = None
        else:
            values: dict[str, Any] = dict((raw.get("metadata") or {}).get("labels") or {})
            # Always the real name: before v1.21 the API server stores whatever a user sets for this label.
            values[NAMESPACE_NAME_LABEL] = name
            labels = MappingProxyType(values)
        if self._namespaces.get(name) == labels:
            return
        if labels is None:
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = labels
        for key in [k for k in self._identities if k[0] == name]:
            del self._identities[key]
        self._changed(namespace=name)

    # ---------------------------------------------------------------- service accounts
    def _replace_service_accounts(self, items: list[RawObject]) -> None:
        listed = {_key(raw): raw for raw in items}
        for key in set(self._service_accounts) - set(listed):
            self._set_service_account(key, None)
        for key, raw in listed.items():
            self._set_service_account(key, raw)

    def _service_account_event(self, event: str, raw: RawObject) -> None:
        self._set_service_account(_key(raw), None if event == "DELETED" else raw)

    def _set_service_account(self, key: PodKey, raw: RawObject | None) -> None:
        old = self._service_accounts.get(key)
        if raw is None:
            self._service_accounts.pop(key, None)
            if old is not None:
                self._gone_service_accounts.add(old.uid)
            return
        secrets = frozenset(
            str(ref.get("name")) for ref in raw.get("secrets") or [] if isinstance(ref, dict) and ref.get("name")
        )
        record = ServiceAccountRecord(uid=str((raw.get("metadata") or {}).get("uid", "")), secrets=secrets)
        if old is not None and old.uid != record.uid:
            self._gone_service_accounts.add(old.uid)
        self._service_accounts[key] = record


def _key(raw: RawObject) -> PodKey:
    meta = raw.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def _start_time(raw: RawObject) -> str:
    status = raw.get("status") or {}
    meta = raw.get("metadata") or {}
    return str(status.get("startTime") or meta.get("creationTimestamp") or "")
