"""The decision engine: compiled policies + facts -> decision, exactly as docs/policy-reference.md states it.

Owns: `compile_policy` (one object -> indexes), `PolicySet` (an immutable snapshot of everything in force, grouped
by namespace and by tier), `match_rules` (step 5 for one view), `Engine.decide` (the tier walk of step 7: Admin by
priority -> the namespace tier -> Baseline by priority -> default_action). Pure: no I/O, no mitmproxy, no kubernetes
imports. The clock is an argument.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from egress_gateway.policy.addresses import AddressClass, AddressPolicy, IPNetwork
from egress_gateway.policy.decision import Decider, Decision, Facts, Identity, IPAddress, PolicyRef, Reason
from egress_gateway.policy.errors import InvalidTarget
from egress_gateway.policy.hostnames import HostPattern, parse_host_pattern
from egress_gateway.policy.indexes import CidrIndex, HostIndex
from egress_gateway.policy.model import (
    DEFAULT_PROTOCOLS,
    NAMESPACE_NAME_LABEL,
    PRIORITY_MAX,
    Action,
    ClusterEgressPolicy,
    Mode,
    PolicyObject,
    Tier,
)
from egress_gateway.policy.selectors import SELECT_ALL, Selector, compile_selector
from egress_gateway.policy.targets import NormalizedHost, canonical_ip, normalize_host, parse_authority


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    name: str
    action: Action
    ports: tuple[PortRange, ...] | None
    expires_at: float | None  # POSIX seconds
    excepts: tuple[IPNetwork, ...]
    order: int
    policy: CompiledPolicy
    host_patterns: tuple[HostPattern, ...]
    networks: tuple[IPNetwork, ...]
    decider: Decider  # how a decision names this rule (built once, reused by every decision)
    deciders: tuple[Decider, ...]  # (decider,)
    protocols: frozenset[str] = frozenset(DEFAULT_PROTOCOLS)  # what an Allow/Log rule lets a tunnel carry

    def port_matches(self, port: int) -> bool:
        ports = self.ports
        if ports is None:
            return True
        for allowed in ports:  # noqa: SIM110 (a plain loop: cheaper than a generator for the usual 1-3 entries)
            if allowed.low <= port <= allowed.high:
                return True
        return False

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def excepted(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.excepts)


@dataclass(eq=False, slots=True)
class CompiledPolicy:
    ref: PolicyRef
    source: PolicyObject
    mode: Mode
    namespace: str | None  # None for ClusterEgressPolicy
    pod_selector: Selector
    namespace_selector: Selector
    tier: Tier
    priority: int
    no_match: Decider  # how a no_matching_rule decision names this policy
    where: str  # " (Admin tier, priority 10)" in decision sentences; "" in the namespace tier
    rules: tuple[CompiledRule, ...] = ()
    hosts: HostIndex[CompiledRule] = field(default_factory=HostIndex)
    cidrs: CidrIndex[CompiledRule] = field(default_factory=CidrIndex)

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return (self.ref.kind, self.ref.namespace or "", self.ref.name)

    def selects(self, identity: Identity) -> bool:
        if self.namespace is not None and self.namespace != identity.namespace:
            return False
        if not self.namespace_selector.selects_all and not self.namespace_selector.matches(_namespace_labels(identity)):
            return False
        return self.pod_selector.matches(identity.labels)


def _namespace_labels(identity: Identity) -> Mapping[str, str]:
    # The name label is always the identity's own namespace, whatever a resolver copied from a stored label: a
    # tenant who may label its namespace must not match selectors written for another namespace's name.
    if identity.namespace_labels.get(NAMESPACE_NAME_LABEL) == identity.namespace:
        return identity.namespace_labels
    return {**identity.namespace_labels, NAMESPACE_NAME_LABEL: identity.namespace}


def _port_ranges(ports: list[int | str] | None) -> tuple[PortRange, ...] | None:
    if ports is None or len(ports) == 0:
        return None
    out = []
    for port in ports:
        if isinstance(port, int):
            out.append(PortRange(port, port))
        else:
            low, _, high = port.partition("-")
            out.append(PortRange(int(low), int(high or low)))
    return tuple(out)


def compile_policy(policy: PolicyObject, version: str) -> CompiledPolicy:
    """Compile one validated object. `version` is its generation (Kubernetes) or content hash (files)."""
    is_cluster = isinstance(policy, ClusterEgressPolicy)
    ref = PolicyRef(policy.kind, policy.metadata.namespace, policy.metadata.name, version)
    tier = policy.spec.tier if isinstance(policy, ClusterEgressPolicy) else Tier.NAMESPACE
    priority = policy.spec.priority if isinstance(policy, ClusterEgressPolicy) else 0
    compiled = CompiledPolicy(
        ref=ref,
        source=policy,
        mode=policy.spec.mode,
        namespace=None if is_cluster else policy.metadata.namespace,
        pod_selector=compile_selector(policy.spec.pod_selector),
        namespace_selector=(
            compile_selector(policy.spec.namespace_selector) if isinstance(policy, ClusterEgressPolicy) else SELECT_ALL
        ),
        tier=tier,
        priority=priority,
        no_match=Decider(tier.value, ref, "NoMatch"),
        where="" if tier is Tier.NAMESPACE else f" ({tier.value} tier, priority {priority})",
    )
    rules = []
    for order, rule in enumerate(policy.spec.rules):
        host_patterns = tuple(parse_host_pattern(host) for host in rule.hosts or ())
        networks = tuple(ipaddress.ip_network(cidr) for cidr in rule.cidrs or ())
        compiled_rule = CompiledRule(
            name=rule.name,
            action=rule.action,
            ports=_port_ranges(rule.ports),
            expires_at=rule.expires.timestamp() if rule.expires else None,
            excepts=tuple(ipaddress.ip_network(e) for e in rule.except_ or ()),
            order=order,
            policy=compiled,
            host_patterns=host_patterns,
            networks=networks,
            decider=(decider := Decider(tier.value, ref, rule.action.value, rule.name)),
            deciders=(decider,),
            protocols=frozenset(rule.protocols or DEFAULT_PROTOCOLS),
        )
        rules.append(compiled_rule)
    compiled.rules = tuple(rules)
    _index_rules(compiled, compiled.rules)
    return compiled


def _index_rules(target: CompiledPolicy | RuleView, rules: Iterable[CompiledRule]) -> None:
    for rule in rules:
        for pattern in rule.host_patterns:
            target.hosts.add(pattern, rule)
        for network in rule.networks:
            target.cidrs.add(network, rule)


class RuleView:
    """The merged indexes of several policies: what one client's selection compiles to.

    Built once per distinct tuple of compiled policies and cached by the engine, so an update to one policy only
    rebuilds the views that include it, and the cost of a decision does not grow with the number of selected policies.
    """

    __slots__ = ("cidrs", "hosts", "policies")

    def __init__(self, policies: tuple[CompiledPolicy, ...]) -> None:
        self.policies = policies
        self.hosts: HostIndex[CompiledRule] = HostIndex()
        self.cidrs: CidrIndex[CompiledRule] = CidrIndex()
        _index_rules(self, (rule for policy in policies for rule in policy.rules))


class PolicySet:
    """An immutable snapshot of the policies in force. Build a new one for every change."""

    _SELECTION_CACHE_LIMIT = 4096

    def __init__(
        self,
        by_namespace: dict[str, tuple[CompiledPolicy, ...]],
        cluster: tuple[CompiledPolicy, ...],
        generation: int,
    ) -> None:
        self._by_namespace = by_namespace
        self._cluster = cluster
        # Per tier, in evaluation order: (priority, name) for Admin and Baseline, the old kind/name order otherwise.
        self._admin = _tier_order(p for p in cluster if p.tier is Tier.ADMIN)
        self._cluster_namespace_tier = tuple(p for p in cluster if p.tier is Tier.NAMESPACE)
        self._baseline = _tier_order(p for p in cluster if p.tier is Tier.BASELINE)
        self.generation = generation
        self._selection_cache: dict[int, tuple[Identity, Selection]] = {}

    @classmethod
    def build(cls, policies: Iterable[CompiledPolicy], previous: PolicySet | None = None) -> PolicySet:
        by_namespace: dict[str, list[CompiledPolicy]] = {}
        cluster: list[CompiledPolicy] = []
        for policy in sorted(policies, key=lambda p: p.sort_key):
            if policy.namespace is None:
                cluster.append(policy)
            else:
                by_namespace.setdefault(policy.namespace, []).append(policy)
        generation = previous.generation + 1 if previous is not None else 0
        return cls({k: tuple(v) for k, v in by_namespace.items()}, tuple(cluster), generation)

    @property
    def policies(self) -> tuple[CompiledPolicy, ...]:
        return tuple(p for group in self._by_namespace.values() for p in group) + self._cluster

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_namespace.values()) + len(self._cluster)

    def next_expiry(self, now: float) -> tuple[float, CompiledRule] | None:
        """The earliest rule `expires` after `now` (POSIX seconds) and its rule, None when no rule expires later:
        when open tunnels must be re-decided next."""
        soonest: tuple[float, CompiledRule] | None = None
        for policy in self.policies:
            for rule in policy.rules:
                at = rule.expires_at
                if at is not None and at > now and (soonest is None or at < soonest[0]):
                    soonest = (at, rule)
        return soonest

    def select(self, identity: Identity) -> Selection:
        """Step 4: the policies selecting the client, grouped into tiers (cached per identity object)."""
        cached = self._selection_cache.get(id(identity))
        if cached is not None and cached[0] is identity:
            return cached[1]
        namespace_tier = tuple(p for p in self._by_namespace.get(identity.namespace, ()) if p.selects(identity))
        namespace_tier += tuple(p for p in self._cluster_namespace_tier if p.selects(identity))
        admin = tuple(p for p in self._admin if p.selects(identity))
        baseline = tuple(p for p in self._baseline if p.selects(identity))
        selection = Selection(
            admin=_priority_groups(Tier.ADMIN, admin),
            namespace=TierGroup.of(Tier.NAMESPACE, 0, namespace_tier),
            baseline=_priority_groups(Tier.BASELINE, baseline),
            admin_tier=TierGroup.of(Tier.ADMIN, -1, admin),
            baseline_tier=TierGroup.of(Tier.BASELINE, -1, baseline),
        )
        if len(self._selection_cache) >= self._SELECTION_CACHE_LIMIT:
            self._selection_cache.clear()
        self._selection_cache[id(identity)] = (identity, selection)
        return selection


def _tier_order(policies: Iterable[CompiledPolicy]) -> tuple[CompiledPolicy, ...]:
    return tuple(sorted(policies, key=lambda p: (p.priority, p.ref.name)))


def _priority_groups(tier: Tier, policies: tuple[CompiledPolicy, ...]) -> tuple[TierGroup, ...]:
    groups: list[TierGroup] = []
    start = 0
    for i in range(1, len(policies) + 1):
        if i == len(policies) or policies[i].priority != policies[start].priority:
            groups.append(TierGroup.of(tier, policies[start].priority, policies[start:i]))
            start = i
    return tuple(groups)


@dataclass(eq=False, slots=True)
class TierGroup:
    """Selecting policies of one tier: at one priority (what `explain` walks), or the whole tier (priority -1) whose
    merged view the engine matches once, keeping the rules of the lowest priority that has any (`match_first_priority`).
    Views are filled in by the engine."""

    tier: Tier
    priority: int
    policies: tuple[CompiledPolicy, ...]
    enforce: tuple[CompiledPolicy, ...]
    view_all: CompiledPolicy | RuleView | None = None
    view_enforce: CompiledPolicy | RuleView | None = None
    # Built once per selection so a decision only picks them up:
    no_match_all: tuple[Decider, ...] = field(init=False)
    no_match_enforce: tuple[Decider, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.no_match_all = tuple(p.no_match for p in self.policies)
        self.no_match_enforce = tuple(p.no_match for p in self.enforce)

    @classmethod
    def of(cls, tier: Tier, priority: int, policies: tuple[CompiledPolicy, ...]) -> TierGroup:
        return cls(tier, priority, policies, tuple(p for p in policies if p.mode is Mode.ENFORCE))

    @property
    def has_audit(self) -> bool:
        return len(self.enforce) != len(self.policies)


@dataclass(eq=False, slots=True)
class Selection:
    """The policies selecting one client, by tier in evaluation order (step 4)."""

    admin: tuple[TierGroup, ...]  # by priority
    namespace: TierGroup
    baseline: tuple[TierGroup, ...]  # by priority
    admin_tier: TierGroup  # all of `admin`, matched as one view
    baseline_tier: TierGroup  # all of `baseline`, matched as one view
    views_ready: bool = False
    groups: tuple[TierGroup, ...] = field(init=False)  # what the engine matches, in evaluation order
    has_audit: bool = field(init=False)

    def __post_init__(self) -> None:
        self.groups = (self.admin_tier, self.namespace, self.baseline_tier)
        self.has_audit = any(group.has_audit for group in self.groups)

    @property
    def policies(self) -> tuple[CompiledPolicy, ...]:
        return tuple(p for group in self.groups for p in group.policies)

    def selects(self, audit: bool) -> bool:
        return any(group.policies if audit else group.enforce for group in self.groups)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    default_allow: bool = False
    allowed_ranges: tuple[IPNetwork, ...] = ()
    own_addresses: frozenset[IPAddress] = frozenset()
    require_sni_match: bool = True


@dataclass(slots=True)
class Matches:
    """What one view's rules say about one destination (step 5): the first rule found per action."""

    deny: tuple[CompiledRule, str] | None = None
    allow: tuple[CompiledRule, str] | None = None
    log: tuple[CompiledRule, str] | None = None
    pass_: tuple[CompiledRule, str] | None = None
    allow_by_cidr: bool = False  # an Allow/Log rule covered the destination IP through an explicit `cidrs` entry
    protocol_refused: tuple[CompiledRule, str] | None = None  # an Allow/Log rule matched but not the protocol

    @property
    def deciding(self) -> tuple[CompiledRule, str] | None:
        """Deny beats Allow/Log (Log named first, so the flag is traceable), which beat Pass."""
        return self.deny or self.log or self.allow


def match_rules(
    view: CompiledPolicy | RuleView | None,
    name: str | None,
    sni: str | None,
    address: IPAddress | None,
    port: int,
    now: float,
    protocol: str | None = None,
) -> Matches:
    """Step 5 for one policy or one merged view. Pure; also used by `explain`."""
    found = Matches()

    def consider(rule: CompiledRule, matched: str, by_cidr: bool, sni_only: bool) -> None:
        if not rule.port_matches(port) or not rule.active(now):
            return
        if rule.action is Action.DENY:
            if found.deny is None:
                found.deny = (rule, matched)
            return
        if sni_only:
            return  # the SNI is consulted for Deny rules only
        if rule.action is Action.PASS:
            if found.pass_ is None:
                found.pass_ = (rule, matched)
            return
        if protocol is not None and protocol not in rule.protocols:
            if found.protocol_refused is None:
                found.protocol_refused = (rule, matched)
            return
        if by_cidr:
            found.allow_by_cidr = True
        if rule.action is Action.LOG:
            if found.log is None:
                found.log = (rule, matched)
        elif found.allow is None:
            found.allow = (rule, matched)

    if view is None:
        return found
    if name is not None:
        for rule, pattern in view.hosts.lookup(name):
            consider(rule, pattern, False, False)
    if sni is not None and sni != name:
        for rule, pattern in view.hosts.lookup(sni):
            consider(rule, pattern, False, True)
    if address is not None and view.cidrs:
        for rule, cidr in view.cidrs.lookup(address):
            if not rule.excepted(address):
                consider(rule, cidr, True, False)
    return found


def match_first_priority(
    view: CompiledPolicy | RuleView | None,
    name: str | None,
    sni: str | None,
    address: IPAddress | None,
    port: int,
    now: float,
    protocol: str | None = None,
) -> Matches:
    """Step 5 for a whole Admin or Baseline tier in one lookup: the matches of the lowest priority that has any.

    The same filters as `match_rules`; a match at a lower priority number discards what was kept for a higher one,
    so the result is what walking the tier priority by priority finds first, at the cost of one lookup.
    """
    found = Matches()
    best = PRIORITY_MAX + 1

    def consider(rule: CompiledRule, matched: str, sni_only: bool) -> None:
        nonlocal best, found
        if not rule.port_matches(port) or not rule.active(now):
            return
        action = rule.action
        if sni_only and action is not Action.DENY:
            return  # the SNI is consulted for Deny rules only
        priority = rule.policy.priority
        if priority > best:
            return
        if priority < best:
            best = priority
            found = Matches()
        if action is Action.DENY:
            if found.deny is None:
                found.deny = (rule, matched)
        elif action is Action.PASS:
            if found.pass_ is None:
                found.pass_ = (rule, matched)
        elif protocol is not None and protocol not in rule.protocols:
            if found.protocol_refused is None:
                found.protocol_refused = (rule, matched)
        elif action is Action.LOG:
            if found.log is None:
                found.log = (rule, matched)
        elif found.allow is None:
            found.allow = (rule, matched)

    if view is None:
        return found
    if name is not None:
        for rule, pattern in view.hosts.lookup(name):
            consider(rule, pattern, False)
    if sni is not None and sni != name:
        for rule, pattern in view.hosts.lookup(sni):
            consider(rule, pattern, True)
    if address is not None and view.cidrs:
        for rule, cidr in view.cidrs.lookup(address):
            if not rule.excepted(address):
                consider(rule, cidr, False)
    return found


def _deny(reason: Reason, message: str, **kwargs: object) -> Decision:
    return Decision(allowed=False, reason=reason, message=message, **kwargs)  # type: ignore[arg-type]


class Engine:
    """Decides one connection. Swap `policies` for a new `PolicySet` at any time; decisions read it once."""

    def __init__(self, config: EngineConfig | None = None, policies: PolicySet | None = None) -> None:
        self.config = config or EngineConfig()
        self.addresses = AddressPolicy(self.config.allowed_ranges, self.config.own_addresses)
        self._views: dict[tuple[int, ...], RuleView] = {}
        self.policies = policies if policies is not None else PolicySet.build(())

    @property
    def policies(self) -> PolicySet:
        return self._policies

    @policies.setter
    def policies(self, policies: PolicySet) -> None:
        self._policies = policies
        # Merged views of replaced policies would keep every old compiled policy alive (found by bench/soak.py:
        # memory grew with each policy edit until the view cache filled); keep only views of policies in force.
        live = {id(policy) for policy in policies.policies}
        self._views = {key: view for key, view in self._views.items() if all(i in live for i in key)}

    # ---- step 1 and 2 -------------------------------------------------------------------------------------
    def _normalize(self, facts: Facts) -> tuple[NormalizedHost, str | None, IPAddress | None] | Decision:
        if not 1 <= facts.port <= 65535:
            return _deny(Reason.INVALID_TARGET, f"port {facts.port} is outside 1..65535")
        try:
            target = normalize_host(facts.target)
        except InvalidTarget as exc:
            return _deny(Reason.INVALID_TARGET, f"invalid target {facts.target!r}: {exc}")
        sni: str | None = None
        if facts.sni:
            try:
                sni_host = normalize_host(facts.sni)
            except InvalidTarget as exc:
                return _deny(Reason.INVALID_TARGET, f"invalid TLS SNI {facts.sni!r}: {exc}")
            sni = str(sni_host)
        destination = canonical_ip(facts.destination_ip) if facts.destination_ip is not None else target.ip
        if target.ip is not None and destination != target.ip:
            return _deny(
                Reason.INVALID_TARGET,
                f"destination {destination} differs from the requested IP literal {target.ip}",
            )
        return target, sni, destination

    def _consistency(self, facts: Facts, target: NormalizedHost, sni: str | None) -> Decision | None:
        if not self.config.require_sni_match:
            return None
        if target.name is not None and sni is not None and sni != target.name:
            return _deny(
                Reason.SNI_MISMATCH,
                f"TLS SNI {sni!r} differs from the requested host {target.name!r} (domain fronting is not allowed)",
            )
        if facts.host_header is not None:
            try:
                host, port = parse_authority(facts.host_header, default_port=facts.port)
                header = normalize_host(host)
            except InvalidTarget as exc:
                return _deny(Reason.HOST_MISMATCH, f"invalid Host header {facts.host_header!r}: {exc}")
            if header != target or port != facts.port:
                return _deny(
                    Reason.HOST_MISMATCH,
                    f"Host header {facts.host_header!r} differs from the request target {target}:{facts.port}",
                )
        return None

    # ---- steps 4 to 8 -------------------------------------------------------------------------------------
    _VIEW_CACHE_LIMIT = 1024

    def _view(self, policies: tuple[CompiledPolicy, ...]) -> CompiledPolicy | RuleView | None:
        if not policies:
            return None
        if len(policies) == 1:
            return policies[0]
        key = tuple(id(p) for p in policies)
        view = self._views.get(key)
        if view is None or view.policies != policies:
            if len(self._views) >= self._VIEW_CACHE_LIMIT:
                self._views.clear()
            view = self._views[key] = RuleView(policies)
        return view

    def _with_views(self, selection: Selection) -> Selection:
        if not selection.views_ready:
            for group in selection.groups:
                group.view_enforce = self._view(group.enforce)
                group.view_all = self._view(group.policies) if group.has_audit else group.view_enforce
            selection.views_ready = True
        return selection

    @staticmethod
    def _cidr_allows(
        selection: Selection, audit: bool, name: str | None, sni: str | None, address: IPAddress, port: int,
        now: float,
    ) -> bool:  # fmt: skip
        """Step 6 for a private IP: does an Allow rule of a selected policy (any tier) list it under `cidrs`?"""
        return any(
            match_rules(group.view_all if audit else group.view_enforce, name, sni, address, port, now).allow_by_cidr
            for group in selection.groups
        )

    @staticmethod
    def _rule_decision(chosen: tuple[CompiledRule, str], where: str, passes: tuple[Decider, ...]) -> Decision:
        """Step 7: the decision of the deciding rule."""
        rule, matched = chosen
        denied = rule.action is Action.DENY
        policy = rule.policy
        return Decision(
            allowed=not denied,
            reason=Reason.DENIED_BY_RULE if denied else Reason.ALLOWED_BY_RULE,
            message=f"{where} is {'denied' if denied else 'allowed'} by rule {rule.name!r} of {policy.ref}"
            f"{policy.where} (matched {matched})",
            policy=policy.ref,
            rule=rule.name,
            matched=matched,
            logged=rule.action is Action.LOG,
            tier=rule.decider.tier,
            deciders=(*passes, rule.decider) if passes else rule.deciders,
            protocols=None if denied else rule.protocols,
        )

    @classmethod
    def _group_decision(
        cls, found: Matches, where: str, protocol: str | None, passes: tuple[Decider, ...]
    ) -> Decision | None:
        """Step 7 for one group: its deciding rule, else an Allow/Log that did not list the protocol; else None."""
        chosen = found.deciding
        if chosen is not None:
            return cls._rule_decision(chosen, where, passes)
        if found.protocol_refused is not None:
            return cls._protocol_refusal(found.protocol_refused, where, protocol, passes)
        return None

    @staticmethod
    def _protocol_refusal(
        refused: tuple[CompiledRule, str], where: str, protocol: str | None, passes: tuple[Decider, ...]
    ) -> Decision:
        """Step 7: the matching Allow/Log rule does not list the tunnel's protocol (and nothing else decided)."""
        rule, matched = refused
        allowed = ", ".join(sorted(rule.protocols))
        return _deny(
            Reason.PROTOCOL_NOT_ALLOWED,
            f"{where} carries {protocol}, which rule {rule.name!r} of {rule.policy.ref}{rule.policy.where} does not "
            f"allow (protocols: {allowed}; matched {matched})",
            policy=rule.policy.ref,
            rule=rule.name,
            matched=matched,
            tier=rule.decider.tier,
            deciders=(*passes, rule.decider) if passes else rule.deciders,
        )

    def _evaluate(
        self,
        selection: Selection,
        audit: bool,
        target: NormalizedHost,
        sni: str | None,
        address: IPAddress | None,
        port: int,
        now: float,
        protocol: str | None = None,
    ) -> Decision:
        """Steps 6 and 7 over the Enforce-mode policies (audit=False) or all selected policies (audit=True)."""
        name = target.name
        # 6. Address safety
        if address is not None:
            verdict = self.addresses.classify(address)
            if verdict.cls is AddressClass.BLOCKED:
                return _deny(Reason.BLOCKED_ADDRESS, f"destination {verdict.detail}; it is never reachable")
            if verdict.cls is AddressClass.PRIVATE and not self._cidr_allows(
                selection, audit, name, sni, address, port, now
            ):
                return _deny(
                    Reason.PRIVATE_ADDRESS,
                    f"destination {verdict.detail}; only an Allow rule listing it under `cidrs` can reach it",
                )
        where = f"{target}:{port}"
        passes: tuple[Decider, ...] = ()
        # 7a. Admin tier: the lowest priority with a match decides (Allow/Log/Deny) or ends the tier (Pass)
        tier = selection.admin_tier
        if tier.policies:
            found = match_first_priority(
                tier.view_all if audit else tier.view_enforce, name, sni, address, port, now, protocol
            )
            decided = self._group_decision(found, where, protocol, passes)
            if decided is not None:
                return decided
            if found.pass_ is not None:
                passes = (found.pass_[0].decider,)
        # 7b. Namespace tier: a matching rule decides; else selecting the client allowlists it
        namespace = selection.namespace
        found = match_rules(
            namespace.view_all if audit else namespace.view_enforce, name, sni, address, port, now, protocol
        )
        decided = self._group_decision(found, where, protocol, passes)
        if decided is not None:
            return decided
        selected = namespace.policies if audit else namespace.enforce
        if selected:
            no_match = namespace.no_match_all if audit else namespace.no_match_enforce
            names = ", ".join(str(p.ref) for p in selected[:3])
            if len(selected) > 3:
                names += f" and {len(selected) - 3} more"
            return _deny(
                Reason.NO_MATCHING_RULE,
                f"{where} matches no rule of the policies selecting this client ({names})",
                policy=selected[0].ref,
                tier=Tier.NAMESPACE.value,
                deciders=(*passes, *no_match) if passes else no_match,
            )
        # 7c. Baseline tier, as 7a
        tier = selection.baseline_tier
        if tier.policies:
            found = match_first_priority(
                tier.view_all if audit else tier.view_enforce, name, sni, address, port, now, protocol
            )
            decided = self._group_decision(found, where, protocol, passes)
            if decided is not None:
                return decided
            if found.pass_ is not None:
                passes = (*passes, found.pass_[0].decider)
        # 7d. default_action
        consulted = "no policy decided" if selection.selects(audit) else "no policy selects this client"
        if self.config.default_allow:
            return Decision(
                allowed=True,
                reason=Reason.NO_POLICY,
                message=f"{consulted}; default action allows {where}",
                deciders=passes,
            )
        return _deny(Reason.NO_POLICY, f"{consulted}; default action denies {where}", deciders=passes)

    def decide(self, facts: Facts, now: float | None = None) -> Decision:
        # 1. Normalize
        normalized = self._normalize(facts)
        if isinstance(normalized, Decision):
            return normalized
        target, sni, address = normalized
        # 2. Consistency
        inconsistent = self._consistency(facts, target, sni)
        if inconsistent is not None:
            return inconsistent
        # 3. Identity
        if facts.identity is None:
            return _deny(Reason.UNKNOWN_CLIENT, "the client's identity is unknown (no workload owns its address)")
        # 4. Selection, by tier
        now = time.time() if now is None else now
        selection = self._with_views(self.policies.select(facts.identity))
        # 5.-7. Match, address safety, tier walk (Enforce-mode policies)
        enforced = self._evaluate(selection, False, target, sni, address, facts.port, now, facts.protocol)
        # 8. Audit mode
        if not selection.has_audit or not enforced.allowed:
            return enforced
        audit = self._evaluate(selection, True, target, sni, address, facts.port, now, facts.protocol)
        if audit.allowed:
            return enforced
        return replace(
            enforced,
            message=f"{enforced.message}; an Audit-mode policy would deny it: {audit.message}",
            would_deny=True,
            audit_reason=audit.reason,
            audit_policy=audit.policy,
            audit_rule=audit.rule,
            audit_deciders=audit.deciders,
        )
