"""Wiring of `egress-gateway run`: settings -> store + source -> engine -> identity chain -> recorder -> proxy + admin.

Owns the process lifecycle: start order (admin first so /healthz answers, then the proxy, then the policy source),
the policy-change subscription (swap the engine's policies, revoke tunnels that became denied), the same revocation
when cluster identities change (pod or namespace relabelled, pod gone), and the SIGTERM drain (stop accepting,
wait for open connections up to `shutdown_grace_s`, close the rest, exit 0).
It is the only module that knows every adapter. One process per gateway: scale out with replicas
(docs/configuration.md, "Scaling").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from egress_gateway.admin import AdminServer
from egress_gateway.audit import build_recorder as build_audit_recorder
from egress_gateway.audit.recorder import Recorder
from egress_gateway.audit.snapshot import describe_changes, policy_changes
from egress_gateway.engine_config import engine_config
from egress_gateway.identity.base import ChainResolver, IdentityResolver
from egress_gateway.identity.static import StaticIdentityResolver
from egress_gateway.policy.decision import Reason
from egress_gateway.policy.engine import CompiledRule, Engine, PolicySet
from egress_gateway.policy.store import PolicyStore
from egress_gateway.proxy.addon import GatewayAddon, Timeouts
from egress_gateway.proxy.embedded import EmbeddedProxy
from egress_gateway.proxy.gate import Gate
from egress_gateway.proxy.limits import NamespaceRateLimiter
from egress_gateway.proxy.own import OwnAddresses
from egress_gateway.proxy.resolver import Resolver
from egress_gateway.proxy.transparent import start_transparent
from egress_gateway.settings import Settings, configured_own_addresses, split_hostport
from egress_gateway.sources.base import PolicySource
from egress_gateway.wire.heads import HeadLimits

if TYPE_CHECKING:  # imported at run time only when a cluster identity mode is configured
    from egress_gateway.kube.workloads import IdentityChanges

log = structlog.get_logger("egress_gateway")

# identity.mode -> module under egress_gateway.identity exposing `build(settings) -> IdentityResolver`
_IDENTITY_MODULES = {"pod-ip": "pods", "service-account-token": "tokens"}


class ConfigurationError(Exception):
    """A setting that cannot work; reported as one line and exit code 2."""


def build_engine(settings: Settings) -> Engine:
    return Engine(engine_config(settings))


def build_identity(settings: Settings) -> tuple[ChainResolver, list[Any]]:
    """The resolver chain in `identity.mode` order, plus the resolvers that need start()/stop()."""
    resolvers: list[IdentityResolver] = []
    lifecycle: list[Any] = []
    for mode in settings.identity.mode:
        if mode == "static":
            resolvers.append(StaticIdentityResolver(settings.identity.static))
            continue
        module_name = f"egress_gateway.identity.{_IDENTITY_MODULES[mode]}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise ConfigurationError(f"identity.mode {mode!r} is not available in this build ({module_name})") from None
        resolver = module.build(settings)
        resolvers.append(resolver)
        if hasattr(resolver, "start"):
            lifecycle.append(resolver)
    return ChainResolver(resolvers), lifecycle


def build_source(settings: Settings, store: PolicyStore) -> PolicySource:
    if settings.policy_source == "kubernetes":
        from egress_gateway.sources.kubernetes import KubernetesPolicySource

        return KubernetesPolicySource(settings, store)
    from egress_gateway.sources.files import FilePolicySource

    return FilePolicySource(settings.policies_path, store)


def build_recorder(settings: Settings) -> Recorder:
    try:
        return build_audit_recorder(settings)
    except ValueError as exc:  # e.g. an audit.file path that cannot be opened
        raise ConfigurationError(f"audit: {exc}") from None


class Gateway:
    """One running gateway. `start()` returns once it listens; `stop()` drains and shuts everything down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = PolicyStore()
        self.engine = build_engine(settings)
        self.source = build_source(settings, self.store)
        try:
            self.resolver = Resolver(
                settings.resolver.hosts,
                settings.resolver.nameservers,
                settings.resolver.timeout_s,
                max_addresses=settings.resolver.max_addresses,
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.identity, self._identity_lifecycle = build_identity(settings)
        self.recorder = build_recorder(settings)
        listen_host, listen_port = split_hostport(settings.listen)
        admin_host, admin_port = split_hostport(settings.admin_listen)
        # Ports bound to 0 are added once known (start()).
        self.own = OwnAddresses(configured_own_addresses(settings), settings.own_ports)
        self.own.add_port(listen_port, "its proxy port")
        self.own.add_port(admin_port, "its admin port")
        self.gate = Gate(self.engine, self.identity, self.resolver, ready=lambda: self.store.loaded, own=self.own)
        self.proxy = EmbeddedProxy(
            listen_host,
            listen_port,
            idle_timeout_s=settings.timeouts.idle_s,
            data_dir=settings.data_dir,
        )
        self.addon = GatewayAddon(
            self.gate,
            self.recorder,
            Timeouts(
                connect_s=settings.timeouts.connect_s,
                client_hello_s=settings.timeouts.client_hello_s,
                client_request_s=settings.timeouts.client_request_s,
            ),
            settings.limits.max_connections,
            rate=NamespaceRateLimiter(settings.limits.namespace_rate.per_second, settings.limits.namespace_rate.burst),
            head_limits=HeadLimits(
                max_request_line_bytes=settings.limits.max_request_line_bytes,
                max_header_bytes=settings.limits.max_header_bytes,
                max_headers=settings.limits.max_headers,
            ),
            namespace_connections=settings.limits.namespace_connections,
        )
        self.admin = AdminServer(admin_host, admin_port, self.readiness)
        self.listen_addresses: list[tuple[str, int]] = []
        self.transparent_addresses: dict[str, tuple[str, int]] = {}
        self.admin_addresses: list[tuple[str, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self.store.subscribe(self._policies_changed)
        # pod-ip / service-account-token: their shared WorkloadIndex says when the clients' labels change.
        indexes = {id(i): i for r in self._identity_lifecycle if (i := getattr(r, "index", None)) is not None}
        for index in indexes.values():
            index.subscribe(self._identities_changed)

    def readiness(self) -> tuple[bool, str]:
        if not self.store.loaded:
            return False, "policies_not_loaded"
        if not self.listen_addresses:
            return False, "proxy_not_listening"
        unsynced = [type(r).__name__ for r in self._identity_lifecycle if not getattr(r, "ready", True)]
        if unsynced:
            return False, f"identity_not_synced ({', '.join(unsynced)})"
        return True, f"ready ({len(self.store.current)} policies)"

    def _policies_changed(self, policies: PolicySet) -> None:
        self.recorder.policies_in_force(policies)  # recorded before anything is decided under it
        changes = policy_changes(self.engine.policies, policies)
        self.engine.policies = policies
        self._schedule_expiry()
        if self.settings.revoke_open_tunnels:
            change = describe_changes(changes)
            revoked = self._revoke(
                change, tuple(ref for ref, _, _ in changes), cause=f"a policy change ({change}) denies this open tunnel"
            )
            if revoked:
                log.info("tunnels_revoked", cause="policy_change", count=revoked, generation=policies.generation)

    def _revoke(self, change: str, policies: tuple[str, ...], **how: Any) -> int:
        """`addon.revoke` with the recorder told which change the revocations are due to."""
        self.recorder.change_in_effect(change, policies)
        try:
            return self.addon.revoke(**how)
        finally:
            self.recorder.change_in_effect(None)

    def _schedule_expiry(self) -> None:
        """A timer at the next rule `expires` of the policies in force (one at a time, replaced on every change)."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if self._loop is None:
            return
        soonest = self.engine.policies.next_expiry(time.time())
        if soonest is not None:
            at, rule = soonest
            # call_later runs on the loop's monotonic clock: convert once; a little late, never early.
            self._expiry_timer = self._loop.call_later(max(0.0, at - time.time()) + 0.01, self._rule_expired, at, rule)

    def _rule_expired(self, at: float, rule: CompiledRule) -> None:
        self._expiry_timer = None
        when = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
        change = f"rule {rule.name} of {rule.policy.ref} (version {rule.policy.ref.version}) expired at {when}"
        revoked = 0
        if self.settings.revoke_open_tunnels:
            revoked = self._revoke(
                change, (str(rule.policy.ref),), reason=Reason.EXPIRED, cause=f"{change}, which denies this open tunnel"
            )
        log.info("rule_expired", policy=str(rule.policy.ref), rule=rule.name, expires=when, tunnels_closed=revoked)
        self._schedule_expiry()

    def _identities_changed(self, changes: IdentityChanges) -> None:
        """`kube.workloads.IdentityChanges`: re-identify the open tunnels of changed pods and namespaces."""
        if self.settings.revoke_open_tunnels:
            pods = ", ".join(sorted(f"{ns}/{name}" for ns, name in changes.pods)[:10])
            change = (
                f"identity change (pods: {pods or '-'}; namespaces: {', '.join(sorted(changes.namespaces)) or '-'})"
            )
            revoked = self._revoke(change, (), reidentify=changes.refresh)
            if revoked:
                log.info(
                    "tunnels_revoked",
                    cause="identity_change",
                    count=revoked,
                    pods=len(changes.pods),
                    namespaces=len(changes.namespaces),
                )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.admin_addresses = await self.admin.start()
        for _, port in self.admin_addresses:
            self.own.add_port(port, "its admin port")
        for resolver in self._identity_lifecycle:
            await resolver.start()
        # Listen before the first load: until then every connection gets 503 policies_not_loaded.
        self.listen_addresses = await self.proxy.start(self.addon)
        for _, port in self.listen_addresses:
            self.own.add_port(port, "its proxy port")
        self.transparent_addresses = await start_transparent(self.settings, self.proxy, self.addon, self.own)
        await self.source.start()
        if self.store.current is not self.engine.policies:
            self.recorder.policies_in_force(self.store.current)
        self.engine.policies = self.store.current
        self._schedule_expiry()
        log.info(
            "gateway_listening",
            listen=[f"{h}:{p}" for h, p in self.listen_addresses],
            transparent={name: f"{h}:{p}" for name, (h, p) in self.transparent_addresses.items()},
            admin=[f"{h}:{p}" for h, p in self.admin_addresses],
            policies_loaded=self.store.loaded,
            policies=len(self.store.current),
        )

    async def stop(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        grace = self.settings.shutdown_grace_s
        log.info("gateway_draining", open_connections=self.proxy.open_connections, grace_s=grace)
        await self.proxy.stop_accepting()
        closed = await self.proxy.drain(grace)
        await self.proxy.shutdown()
        with contextlib.suppress(Exception):
            await self.source.stop()
        for resolver in self._identity_lifecycle:
            with contextlib.suppress(Exception):
                await resolver.stop()
        await self.admin.stop()
        self.recorder.shutdown()
        log.info("gateway_stopped", closed_at_deadline=closed)


async def serve(
    settings: Settings,
    stop_signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        gateway = Gateway(settings)
    except ConfigurationError as exc:
        log.error("configuration_error", error=str(exc))
        return 2
    try:
        await gateway.start()
    except Exception as exc:  # a listener that cannot bind, a cluster that cannot be reached, ...
        log.error("startup_failed", error=str(exc) or type(exc).__name__)
        with contextlib.suppress(Exception):
            await gateway.stop()
        return 1
    # What startup built (modules, settings, the first policy set) lives as long as the process: moved out of the
    # collector's reach, so that the full collections the per-connection garbage triggers do not walk it each time.
    gc.collect()
    gc.freeze()
    await stop.wait()
    await gateway.stop()
    return 0


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when available (the proxy's hot path is event-loop bound)."""
    if sys.platform != "win32":
        with contextlib.suppress(ImportError):
            import uvloop

            return uvloop.new_event_loop
    return None


def run(settings: Settings, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    """Run the gateway in this process until SIGTERM/SIGINT."""
    with asyncio.Runner(loop_factory=loop_factory or event_loop_factory()) as runner:
        return runner.run(serve(settings))
