"""Lease-based leader election (coordination.k8s.io/v1) deciding which replica writes policy status.

Owns: `StatusLeaderElection`, client-go's algorithm on a Lease: read it; take it when it is absent, ours, or
not renewed within its `leaseDurationSeconds` as measured on our own clock since we last saw it change; write
with the read resourceVersion so two candidates can never both win (409). The leader renews every retry period
and steps down when it could not renew within the renew deadline; on stop it releases the Lease so another
replica takes over at once. `on_change(bool)` reports transitions. Only status writes depend on it; enforcement
never waits for a leader. (The official client's `kubernetes.aio.leaderelection` LeaseLock does not work with
its own pydantic models in 37.x, hence this small loop on the typed CoordinationV1Api.) Imports settings and
kube.client only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from kubernetes.aio.client import ApiClient, CoordinationV1Api, V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.aio.client.exceptions import ApiException

from egress_gateway.kube.client import holder_identity, own_namespace
from egress_gateway.settings import KubernetesSettings

_REQUEST_TIMEOUT_S = 5.0


def _micro_now() -> datetime:
    """Now, for Lease MicroTime fields. The API server parses them with a fixed 6-digit fraction, and the client
    serializes with `isoformat()`, which drops a zero fraction; keep the fraction non-zero."""
    now = datetime.now(UTC)
    return now.replace(microsecond=1) if now.microsecond == 0 else now


class StatusLeaderElection:
    def __init__(self, api: ApiClient, settings: KubernetesSettings, on_change: Callable[[bool], None]) -> None:
        self.identity = holder_identity()
        self.namespace = own_namespace(settings)
        self.lease_name = settings.lease_name
        self._leases = CoordinationV1Api(api)
        self._settings = settings
        self._on_change = on_change
        self._log = structlog.get_logger("egress_gateway.kube").bind(
            lease=f"{self.namespace}/{self.lease_name}", holder=self.identity
        )
        self.leader = False
        self._observed: tuple[str | None, object] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0  # monotonic time it last changed

    async def run(self) -> None:
        s = self._settings
        last_renewed = 0.0
        try:
            while True:
                try:
                    ok = await self._try_acquire_or_renew()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    ok = False
                    self._log.warning("kube_leader_election_error", error=f"{type(exc).__name__}: {exc}")
                now = time.monotonic()
                if ok:
                    last_renewed = now
                    self._set_leader(True)
                elif self.leader and now - last_renewed > s.renew_deadline_s:
                    self._set_leader(False)
                delay = s.retry_period_s * (random.uniform(1.0, 1.2) if not self.leader else 1.0)
                await asyncio.sleep(delay)
        finally:
            if self.leader:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await self._release()
            self._set_leader(False)

    def _set_leader(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            self._log.info("kube_leader_acquired" if leader else "kube_leader_lost")
            self._on_change(leader)

    async def _try_acquire_or_renew(self) -> bool:
        now = _micro_now()
        duration = int(self._settings.lease_duration_s)
        try:
            lease = await self._leases.read_namespaced_lease(
                self.lease_name, self.namespace, _request_timeout=_REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            spec = V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=duration,
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            )
            body = V1Lease(metadata=V1ObjectMeta(name=self.lease_name, namespace=self.namespace), spec=spec)
            return await self._write(self._leases.create_namespaced_lease(self.namespace, body))
        spec = lease.spec or V1LeaseSpec()
        record = (spec.holder_identity, spec.renew_time)
        if record != self._observed:
            self._observed = record
            self._observed_at = time.monotonic()
        held_by_other = bool(spec.holder_identity) and spec.holder_identity != self.identity
        their_duration = spec.lease_duration_seconds or duration
        if held_by_other and time.monotonic() < self._observed_at + their_duration:
            return False
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if spec.holder_identity else 0)
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = duration
        spec.renew_time = now
        if spec.acquire_time is not None and spec.acquire_time.microsecond == 0:  # see _micro_now
            spec.acquire_time = spec.acquire_time.replace(microsecond=1)
        lease.spec = spec
        return await self._write(self._leases.replace_namespaced_lease(self.lease_name, self.namespace, lease))

    async def _write(self, call: object) -> bool:
        try:
            await call  # type: ignore[misc]
        except ApiException as exc:
            if exc.status in (409, 422):  # someone else got there first
                return False
            raise
        return True

    async def _release(self) -> None:
        lease = await self._leases.read_namespaced_lease(self.lease_name, self.namespace)
        if lease.spec is None or lease.spec.holder_identity != self.identity:
            return
        if lease.spec.acquire_time is not None and lease.spec.acquire_time.microsecond == 0:
            lease.spec.acquire_time = lease.spec.acquire_time.replace(microsecond=1)
        lease.spec.holder_identity = None
        lease.spec.lease_duration_seconds = 1
        lease.spec.renew_time = _micro_now()
        await self._leases.replace_namespaced_lease(self.lease_name, self.namespace, lease)
        self._log.info("kube_leader_released")
