"""Engine decision time at 10, 1k, 10k and 100k rules (goal: flat, p99 <= 10 us at 100k).

Three layouts per size: `spread` (rules in 100-rule policies over many namespaces; a client selects one namespace's
policies), `one-client` (every rule selects the same client: worst case for the per-client view) and `tiered`
(`spread` plus two Admin-tier cluster policies at different priorities and a Baseline one, 50 rules each, selecting
every client: each decision walks two Admin groups before the namespace tier). Queries mix
exact hits, wildcard hits, CIDR hits and misses. Also prints the time to compile the policy set and to apply one
policy update (per-object recompile). Run: `.venv/bin/python bench/decision.py [--quick] [--markdown FILE]`.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from egress_gateway.policy.decision import Facts, Identity
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.store import PolicyStore, Versioned
from egress_gateway.policy.validation import validate_object

RULES_PER_POLICY = 100
COLUMNS = ("rules", "layout", "p50 us", "p99 us", "max us", "compile s", "update 1 policy ms", "first decide ms")


def make_policy(namespace: str, index: int, first_rule: int, count: int) -> dict[str, Any]:
    rules = []
    for r in range(first_rule, first_rule + count):
        kind = r % 4
        if kind == 0:
            rules.append({"name": f"r{r}", "hosts": [f"api{r}.svc{r % 97}.example.com"], "ports": [443]})
        elif kind == 1:
            rules.append({"name": f"r{r}", "hosts": [f"*.tenant{r}.example.net"]})
        elif kind == 2:
            rules.append({"name": f"r{r}", "hosts": [f"**.cdn{r}.example.org"], "ports": [443, "8000-8100"]})
        else:
            net = ipaddress.IPv4Network(((198 << 24) + (r << 8)) & 0xFFFFFF00, 24) if r < 65536 else None
            rules.append({"name": f"r{r}", "cidrs": [str(net or f"2001:db8:{r >> 16:x}:{r & 0xFFFF:x}::/64")]})
    return {
        "apiVersion": "egressgateway.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": f"p{index}", "namespace": namespace},
        "spec": {"rules": rules},
    }


def cluster_tiers() -> list[dict[str, Any]]:
    """Admin priority 10 (Deny), Admin priority 20 (Allow), Baseline (Allow); none matches the query mix."""
    out = []
    for name, tier, priority, action in (
        ("admin-deny", "Admin", 10, "Deny"),
        ("admin-allow", "Admin", 20, "Allow"),
        ("baseline", "Baseline", 100, "Allow"),
    ):
        rules = [{"name": f"r{r}", "action": action, "hosts": [f"h{r}.{name}.example.com"]} for r in range(40)]
        rules += [{"name": f"w{r}", "action": action, "hosts": [f"**.w{r}.{name}.example.com"]} for r in range(10)]
        out.append(
            {
                "apiVersion": "egressgateway.io/v1alpha2",
                "kind": "ClusterEgressPolicy",
                "metadata": {"name": name},
                "spec": {"tier": tier, "priority": priority, "rules": rules},
            }
        )
    return out


def build(total: int, layout: str) -> tuple[PolicyStore, float, list[str]]:
    policies = max(1, total // RULES_PER_POLICY)
    per_policy = min(total, RULES_PER_POLICY)
    objects = []
    namespaces = []
    for i in range(policies):
        namespace = "ns-client" if layout == "one-client" else f"ns{i // 10}"
        namespaces.append(namespace)
        objects.append(validate_object(make_policy(namespace, i, i * per_policy, per_policy)))
    if layout == "tiered":
        objects.extend(validate_object(doc) for doc in cluster_tiers())
    store = PolicyStore()
    start = time.perf_counter()
    store.replace_group("bench", [Versioned(o, "1") for o in objects])
    return store, time.perf_counter() - start, namespaces


def queries(total: int, rng: random.Random) -> list[tuple[str, int, ipaddress.IPv4Address]]:
    out = []
    for _ in range(2000):
        r = rng.randrange(total)
        kind = rng.randrange(5)
        ip = ipaddress.IPv4Address("93.184.216.10")
        if kind == 0:
            out.append((f"api{r - r % 4}.svc{(r - r % 4) % 97}.example.com", 443, ip))
        elif kind == 1:
            out.append((f"x.tenant{r - r % 4 + 1}.example.net", 443, ip))
        elif kind == 2:
            out.append((f"a.b.cdn{r - r % 4 + 2}.example.org", 8050, ip))
        elif kind == 3:
            base = r - r % 4 + 3
            out.append(
                (str(ipaddress.IPv4Address((((198 << 24) + (base << 8)) & 0xFFFFFF00) + 7)), 443, ip)
                if base < 65536
                else ("miss.example.com", 443, ip)
            )
        else:
            out.append((f"unknown{r}.example.io", 443, ip))
    return out


def measure(total: int, layout: str, repeats: int) -> dict[str, float]:
    rng = random.Random(total)
    store, compile_s, namespaces = build(total, layout)
    engine = Engine(EngineConfig(), store.current)
    identities = [Identity(ns, "pod", MappingProxyType({"app": "x"})) for ns in sorted(set(namespaces))]
    facts = []
    for host, port, ip in queries(total, rng):
        identity = identities[0] if layout == "one-client" else rng.choice(identities)
        literal = host[0].isdigit()
        facts.append(Facts(identity, host, port, destination_ip=None if literal else ip))
    for f in facts:  # warm the per-client views, as a running gateway would be
        engine.decide(f)
    samples: list[float] = []
    gc.disable()
    try:
        for _ in range(repeats):
            for f in facts:
                t0 = time.perf_counter_ns()
                engine.decide(f)
                samples.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        gc.enable()
    samples.sort()
    update_policy = validate_object(make_policy(namespaces[0], 0, 0, min(total, RULES_PER_POLICY)))
    t0 = time.perf_counter()
    store.upsert(update_policy, "2")
    update_s = time.perf_counter() - t0
    engine.policies = store.current
    t0 = time.perf_counter()
    engine.decide(facts[0])
    first_after_update_s = time.perf_counter() - t0
    return {
        "p50": statistics.median(samples),
        "p99": samples[int(len(samples) * 0.99)],
        "max": samples[-1],
        "compile_s": compile_s,
        "update_ms": update_s * 1000,
        "first_after_update_ms": first_after_update_s * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="sizes up to 10k, fewer repeats")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    sizes = [10, 1_000, 10_000] if args.quick else [10, 1_000, 10_000, 100_000]
    repeats = 2 if args.quick else 5
    table = Table(title="Engine decision time (microseconds per decision)")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    rows = []
    for size in sizes:
        for layout in ("spread", "one-client", "tiered"):
            m = measure(size, layout, repeats)
            row = [
                f"{size:,}",
                layout,
                f"{m['p50']:.1f}",
                f"{m['p99']:.1f}",
                f"{m['max']:.0f}",
                f"{m['compile_s']:.2f}",
                f"{m['update_ms']:.1f}",
                f"{m['first_after_update_ms']:.1f}",
            ]
            rows.append(row)
            table.add_row(*row)
    Console().print(table)
    if args.markdown:
        header = "| " + " | ".join(COLUMNS) + " |"
        lines = [header, "|" + "---|" * 8] + ["| " + " | ".join(r) + " |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
