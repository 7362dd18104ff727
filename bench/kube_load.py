"""Kubernetes source benchmark: load time of many policies, and watch-event-to-enforcement latency.

Runs the real `KubernetesPolicySource` (official asyncio client, list paging, watch) against the fake API server
from the tests (real HTTP on loopback), in one process: the fake on its own thread and event loop, the source on
uvloop like the gateway.

    .venv/bin/python -m bench.kube_load [--namespaces 1000] [--per-namespace 10] [--updates 300]

Rows: `load` = from `start()` to `ready` (paged list of both kinds, validation of every object, one store build);
`event -> enforced` = from the moment a write is stored on the API server to the moment the store has published
the new PolicySet that the engine swaps in (what new connections are decided against), one update at a time,
with all policies loaded. `status writes` (with --status) = time for the leader to write Accepted on every object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from egress_gateway.policy.engine import PolicySet
from egress_gateway.policy.store import PolicyStore
from egress_gateway.settings import Settings
from egress_gateway.sources.kubernetes import KubernetesPolicySource
from tests.kube.fake_apiserver import FakeApiServer

GV = "egressgateway.io/v1alpha1"


def make_policy(namespace: str, name: str, salt: int = 0) -> dict[str, Any]:
    rules = [
        {"name": "api", "hosts": [f"api{salt}.{name}.{namespace}.example.com", "**.svc.example.net"], "ports": [443]},
        {"name": "registry", "hosts": ["registry.example.org", f"*.cdn{salt}.example.org"], "ports": [443, 80]},
        {"name": "partners", "cidrs": ["203.0.113.0/24"], "ports": ["8000-8100"]},
    ]
    return {
        "apiVersion": GV,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": f"t{hash(namespace) % 50}"}},
        "spec": {"podSelector": {"matchLabels": {"app": name}}, "rules": rules},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(server: FakeApiServer, kubeconfig: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    settings = Settings(
        policy_source="kubernetes",
        kubernetes={
            "kubeconfig": kubeconfig,
            "write_status": args.status,
            "lease_namespace": "bench",
            "lease_duration_s": 3,
            "renew_deadline_s": 2,
            "retry_period_s": 1,
        },
    )
    store = PolicyStore()
    source = KubernetesPolicySource(settings, store)
    rows: list[tuple[str, str]] = []
    stalls: list[float] = []

    async def ticker() -> None:  # what a connection waiting on this event loop would feel
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            stalls.append(time.perf_counter() - before - 0.005)

    gc_pauses: list[float] = []
    gc_started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[:] = [time.perf_counter()]
        elif gc_started:
            gc_pauses.append(time.perf_counter() - gc_started[0])

    gc.callbacks.append(on_gc)
    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    await source.start()
    try:
        if not await source.wait_ready(600):
            raise SystemExit("source never became ready")
        load_s = time.perf_counter() - started
        ticking.cancel()
        total = len(store.current)
        rows.append((f"load {total:,} policies in {args.namespaces:,} namespaces", f"{load_s:.2f} s"))
        rows.append(("longest event-loop stall during the load", f"{max(stalls) * 1000:.0f} ms"))
        rows.append(("longest garbage-collection pause during the load", f"{max(gc_pauses or [0]) * 1000:.0f} ms"))
        gc_pauses.clear()
        if args.gc_freeze:
            gc.freeze()  # move everything loaded so far out of the collector's reach

        if args.status:
            t0 = time.perf_counter()
            writer = source.status_writer
            assert writer is not None
            while writer.writes < total:
                await asyncio.sleep(0.05)
                if time.perf_counter() - t0 > 600:
                    break
            rows.append((f"status writes for {writer.writes:,} objects (leader)", f"{time.perf_counter() - t0:.2f} s"))

        published: dict[str, float] = {}
        wanted: dict[str, Any] = {}
        done = asyncio.Event()

        def on_publish(_: PolicySet) -> None:
            key = wanted.get("key")
            if key is None:
                return
            compiled = store.get(key)
            if compiled is not None and compiled.ref.version == wanted["version"]:
                published["t"] = time.perf_counter()
                wanted.clear()
                done.set()

        store.subscribe(on_publish)
        rng = random.Random(7)
        latencies: list[float] = []
        generations: dict[tuple[str, str], int] = {}
        for i in range(args.updates):
            ns = f"ns{rng.randrange(args.namespaces)}"
            name = f"p{rng.randrange(args.per_namespace)}"
            generation = generations.get((ns, name), 1) + 1
            generations[(ns, name)] = generation
            done.clear()
            wanted.update(key=("EgressPolicy", ns, name), version=str(generation))
            t0 = time.perf_counter()
            server.put(make_policy(ns, name, salt=i + 1))
            async with asyncio.timeout(10):
                await done.wait()
            latencies.append((published["t"] - t0) * 1000)
            if latencies[-1] > 200:
                print(f"# slow update {i}: {latencies[-1]:.0f} ms", file=sys.stderr)
        rows.append(("longest garbage-collection pause during the updates", f"{max(gc_pauses or [0]) * 1000:.0f} ms"))
        rows.append(
            (
                f"event -> enforced, {len(latencies)} updates (p50 / p99 / max)",
                f"{statistics.median(latencies):.1f} / {percentile(latencies, 0.99):.1f} / {max(latencies):.1f} ms",
            )
        )
    finally:
        await source.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=1000)
    parser.add_argument("--per-namespace", type=int, default=10)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--status", action="store_true", help="also measure the leader's status writes")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the load, before the updates")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    server = FakeApiServer(bookmark_interval_s=60).start()
    try:
        t0 = time.perf_counter()
        for n in range(args.namespaces):
            for p in range(args.per_namespace):
                server.put(make_policy(f"ns{n}", f"p{p}"))
        print(f"# populated the fake API server in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = server.kubeconfig(Path(tmp) / "kubeconfig")
            loop_factory = None
            with contextlib.suppress(ImportError):
                import uvloop

                loop_factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                rows = runner.run(measure(server, kubeconfig, args))
    finally:
        server.stop()
    print(f"Python {platform.python_version()}, {platform.machine()}, fake API server on loopback")
    print("| measurement | result |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
