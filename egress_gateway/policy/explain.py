"""The tier walk of one decision, policy by policy, for people (`check --explain`).

Owns: `explain(engine, facts, now) -> Walk`. It re-reads the selection the engine used (step 4) and asks each
selected policy on its own what it says about the destination (step 5, the engine's `match_rules`), in the order
of step 7: Admin by priority, the namespace tier, Baseline by priority. The decision itself stays with
`Engine.decide`; this never changes it and is not on the data path. Pure: no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from egress_gateway.policy.decision import Decision, Facts, IPAddress, PolicyRef
from egress_gateway.policy.engine import CompiledPolicy, Engine, TierGroup, match_rules
from egress_gateway.policy.model import Mode, Tier
from egress_gateway.policy.targets import normalize_host

NO_MATCH = "no match"


@dataclass(frozen=True, slots=True)
class PolicyStep:
    """What one selected policy said: Allow, Deny, Log, Pass or "no match", and why."""

    policy: PolicyRef
    tier: str
    priority: int | None  # None in the namespace tier
    mode: str
    says: str
    rule: str | None
    why: str


@dataclass(frozen=True, slots=True)
class TierStep:
    tier: str
    policies: tuple[PolicyStep, ...]
    outcome: str  # what the tier did with the connection, in words


@dataclass(frozen=True, slots=True)
class Walk:
    decision: Decision
    tiers: tuple[TierStep, ...]
    note: str | None = None  # set when the walk was not reached (steps 1-3, 6)


@dataclass(frozen=True, slots=True)
class _Asked:
    name: str | None
    sni: str | None
    address: IPAddress | None
    port: int
    now: float
    where: str


def _policy_step(policy: CompiledPolicy, group: TierGroup, asked: _Asked, consulted: bool) -> PolicyStep:
    priority = None if group.tier is Tier.NAMESPACE else group.priority
    if not consulted:
        why = "not consulted: an earlier priority in this tier decided or passed"
        return PolicyStep(policy.ref, group.tier.value, priority, policy.mode.value, "skipped", None, why)
    found = match_rules(policy, asked.name, asked.sni, asked.address, asked.port, asked.now)
    chosen = found.deciding or found.pass_
    if chosen is None:
        why = f"no rule matches {asked.where}"
        if policy.mode is Mode.AUDIT:
            why += " (Audit mode: counts only for would_deny)"
        return PolicyStep(policy.ref, group.tier.value, priority, policy.mode.value, NO_MATCH, None, why)
    rule, matched = chosen
    why = f"rule {rule.name!r} matched {matched}"
    if policy.mode is Mode.AUDIT:
        why += " (Audit mode: counts only for would_deny)"
    return PolicyStep(policy.ref, group.tier.value, priority, policy.mode.value, rule.action.value, rule.name, why)


def _outcome(group_tier: Tier, decision: Decision, steps: list[PolicyStep]) -> str:
    if decision.tier == group_tier.value:
        return f"decided: {decision.verdict} ({decision.reason})"
    if any(d.tier == group_tier.value and d.verdict == "Pass" for d in decision.deciders):
        return "Pass: the rest of this tier is skipped"
    if not steps:
        return "no policy of this tier selects the client"
    return "nothing decided; on to the next tier"


def explain(engine: Engine, facts: Facts, now: float | None = None) -> Walk:
    now = time.time() if now is None else now
    decision = engine.decide(facts, now=now)
    if facts.identity is None or decision.reason.value in {
        "invalid_target",
        "sni_mismatch",
        "host_mismatch",
        "blocked_address",
        "private_address",
    }:
        return Walk(decision, (), note=f"decided before the tier walk (step {_STEP.get(decision.reason.value, '3')})")
    target = normalize_host(facts.target)
    asked = _Asked(
        name=target.name,
        sni=str(normalize_host(facts.sni)) if facts.sni else None,
        address=facts.destination_ip if facts.destination_ip is not None else target.ip,
        port=facts.port,
        now=now,
        where=f"{target}:{facts.port}",
    )
    deciding = {d.policy for d in decision.deciders if d.verdict != "NoMatch"}
    selection = engine.policies.select(facts.identity)
    tiers: list[TierStep] = []
    for tier, groups in (
        (Tier.ADMIN, selection.admin),
        (Tier.NAMESPACE, (selection.namespace,)),
        (Tier.BASELINE, selection.baseline),
    ):
        steps: list[PolicyStep] = []
        consulted = True
        for group in groups:
            steps.extend(_policy_step(policy, group, asked, consulted) for policy in group.policies)
            if any(p.ref in deciding for p in group.policies):
                consulted = False
        tiers.append(TierStep(tier.value, tuple(steps), _outcome(tier, decision, steps)))
        if decision.tier == tier.value:
            break
    return Walk(decision, tuple(tiers))


_STEP = {
    "invalid_target": "1",
    "sni_mismatch": "2",
    "host_mismatch": "2",
    "unknown_client": "3",
    "blocked_address": "6",
    "private_address": "6",
}


def render(walk: Walk) -> list[str]:
    """The walk as indented lines of text."""
    if walk.note:
        return [walk.note]
    lines = []
    for tier in walk.tiers:
        lines.append(f"{tier.tier} tier: {tier.outcome}")
        for step in tier.policies:
            priority = f" priority {step.priority}" if step.priority is not None else ""
            mode = " [Audit]" if step.mode == Mode.AUDIT.value else ""
            lines.append(f"  {step.policy} (version {step.policy.version}){priority}{mode}: {step.says} - {step.why}")
    if walk.decision.tier is None:
        lines.append(f"default_action: {walk.decision.verdict} ({walk.decision.reason})")
    return lines
