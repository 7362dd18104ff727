"""One command that compares the gateway with Squid and a direct connection in the same run (docs/benchmarks.md).

Starts on loopback: nginx (TLS origin on <origin-address>:443: `/tiny`, `/bulk` = 100 MB), Squid (allowlisting
CONNECT proxy, ssl_bump peek + splice on SNI), the gateway (`python -O -m egress_gateway run`, realistic policy set,
audit to a JSON-lines file), optionally N independent gateway processes on separate ports (`--workers`, like N
replicas: the gateway has no worker mode), and the direct path. Measures, interleaved over repetitions:
new connections/s at several concurrencies, p50/p99 latency at c=1, proxy CPU seconds per 1000 connections (from
/proc), bulk MB/s, peak RSS, RSS with idle tunnels; then the gateway's policy reload costs and the engine
decision benchmark (bench/decision.py). Prints the tables; `--markdown FILE` also writes them between the markers
of FILE (a run without it leaves the checkout clean).

    .venv/bin/python bench/run.py --markdown docs/benchmarks.md   # full run (~7 minutes), rewrites that section
    .venv/bin/python bench/run.py --quick    # < 2 minutes, prints only (add --markdown FILE to write)

Needs root (nginx binds port 443: hey puts host:port into the SNI when the URL has a port), nginx, squid-openssl,
hey and curl (.ci/install-system-deps). Exit code 3 when a prerequisite is missing. Everything stays on loopback.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.certs import make_certificates
from bench.gateway import start_gateway
from bench.hotspots import profile_markdown, py_spy_binary
from bench.idle import IdleResult, hold_idle_tunnels
from bench.load import BulkResult, LoadResult, bulk_run, hey_binary, hey_run
from bench.origin import Origin, nginx_binary, port_free, start_origin
from bench.procs import cpu_seconds, peak_rss_mib, process_tree, rss_mib
from bench.reload import ReloadResult, measure_reload
from bench.squid import has_ssl_bump, squid_binary, start_squid

REPO = Path(__file__).resolve().parents[1]
ORIGIN_HOST = "origin.bench.test"
BEGIN = "<!-- bench/run.py: begin (generated, do not edit by hand) -->"
END = "<!-- bench/run.py: end -->"
EXIT_MISSING = 3


@dataclass
class Target:
    name: str
    proxy: str | None  # None: the direct path
    pid: int | None  # root of the proxy's process tree
    note: str = ""
    # More independent processes behind other ports that share the load (emulated workers); hey is split across them.
    more: list[tuple[str, int]] = field(default_factory=list)
    # Starts a fresh instance of this proxy (same configuration) in the given directory, for the idle-tunnel memory
    # figure: a process that already carried load keeps its grown heap, which would hide the per-tunnel cost.
    fresh: Callable[[Path], Any] | None = None

    @property
    def pids(self) -> list[int]:
        return ([self.pid] if self.pid else []) + [pid for _, pid in self.more]

    @property
    def proxies(self) -> list[str]:
        return ([self.proxy] if self.proxy else []) + [proxy for proxy, _ in self.more]


@dataclass
class Sample:
    load: LoadResult
    cpu_s: float

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu_s / self.load.ok * 1000 if self.load.ok else float("nan")


@dataclass
class TargetResults:
    samples: dict[int, list[Sample]] = field(default_factory=dict)
    bulk: list[tuple[BulkResult, float]] = field(default_factory=list)  # (transfer, proxy CPU s)
    peak_rss_mib: float = float("nan")
    idle: IdleResult | None = None
    processes: int = 0
    audit_lines: int | None = None  # gateway only: lines in its JSON-lines audit trail at the end


@dataclass
class Options:
    reps: int
    duration_s: float
    concurrency: list[int]
    bulk_reps: int
    idle_tunnels: int
    reload_sizes: list[int]
    reload_flips: int
    workers: list[int]
    decision: str  # "full", "quick" or "skip"
    profile_s: float
    variants: bool


def missing_prerequisites(origin_address: str) -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (nginx must bind port 443)")
    if nginx_binary() is None:
        missing.append("nginx")
    squid = squid_binary()
    if squid is None:
        missing.append("squid (squid-openssl)")
    elif not has_ssl_bump(squid):
        missing.append("squid with ssl_bump (squid-openssl)")
    if hey_binary() is None:
        missing.append("hey")
    if shutil.which("curl") is None:
        missing.append("curl")
    if os.geteuid() == 0 and not port_free(origin_address, 443):
        missing.append(f"a free {origin_address}:443 (choose --origin-address)")
    return missing


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{os.cpu_count()} vCPU {model}, {mem_kib / 1024 / 1024:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"

    def dpkg(package: str) -> str:
        return first_line(["dpkg-query", "-W", "-f", "${Version}", package])

    import mitmproxy.version

    return (
        f"nginx {dpkg('nginx')}, squid {dpkg('squid-openssl')}, hey {dpkg('hey')}, "
        f"mitmproxy {mitmproxy.version.VERSION}"
    )


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def spread(values: list[float], digits: int = 0) -> str:
    """`median [min-max]`, or just the value for one sample."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    median = statistics.median(values)
    if len(values) == 1:
        return fmt(median, digits)
    return f"{fmt(median, digits)} [{fmt(min(values), digits)}-{fmt(max(values), digits)}]"


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b > 0 else "-"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _split_load(target: Target, url: str, concurrency: int, duration_s: float) -> LoadResult:
    """One hey per process of an emulated multi-worker target, run at the same time; results added up."""
    share = concurrency // len(target.proxies)
    parts: list[LoadResult] = []
    with concurrent.futures.ThreadPoolExecutor(len(target.proxies)) as pool:
        futures = [
            pool.submit(hey_run, url, share, duration_s, proxy=proxy, host_header=None) for proxy in target.proxies
        ]
        parts = [f.result() for f in futures]
    return LoadResult(
        ok=sum(p.ok for p in parts),
        errors=sum(p.errors for p in parts),
        seconds=max(p.seconds for p in parts),
        conn_per_s=sum(p.conn_per_s for p in parts),
        p50_ms=statistics.mean(p.p50_ms for p in parts),
        p99_ms=max(p.p99_ms for p in parts),
    )


def _tree_cpu(target: Target) -> float:
    return sum(cpu_seconds(pid) for pid in target.pids)


def measure_load(targets: list[Target], origin: Origin, results: dict[str, TargetResults], opts: Options) -> None:
    for rep in range(opts.reps):
        for concurrency in opts.concurrency:
            # Rotate the order each repetition so that no target always runs right after the same neighbour.
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for target in order:
                if target.more and concurrency < len(target.proxies):
                    continue  # cannot split c=1 over two processes
                url = origin.tiny_url if target.proxy else f"https://{origin.address}/tiny"
                cpu_before = _tree_cpu(target)
                if target.more:
                    load = _split_load(target, url, concurrency, opts.duration_s)
                else:
                    load = hey_run(
                        url,
                        concurrency,
                        opts.duration_s,
                        proxy=target.proxy,
                        host_header=None if target.proxy else origin.hostname,
                    )
                cpu = _tree_cpu(target) - cpu_before if target.pid else float("nan")
                results[target.name].samples.setdefault(concurrency, []).append(Sample(load, cpu))
                log(
                    f"rep {rep + 1} c={concurrency:<3} {target.name:<20} {load.conn_per_s:7.0f} conn/s "
                    f"p50 {load.p50_ms:6.2f} ms  cpu/1000 {Sample(load, cpu).cpu_per_1000:5.2f} s  "
                    f"ok {load.ok} errors {load.errors}"
                )


def measure_bulk(
    targets: list[Target], origin: Origin, ca_file: str, results: dict[str, TargetResults], opts: Options
) -> None:
    def transfer(target: Target) -> BulkResult:
        if target.proxy:
            return bulk_run(origin.bulk_url, ca_file, proxy=target.proxy, resolve=None)
        return bulk_run(origin.bulk_url, ca_file, proxy=None, resolve=f"{origin.hostname}:443:{origin.address}")

    single = [t for t in targets if not t.more]  # one transfer uses one process: nothing to learn from the others
    for target in single:  # warm-up: the first read of the file and the first large buffers are not measured
        transfer(target)
    for rep in range(opts.bulk_reps):
        for target in single:
            cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
            bulk = transfer(target)
            cpu = cpu_seconds(target.pid) - cpu_before if target.pid else float("nan")
            results[target.name].bulk.append((bulk, cpu))
            log(f"bulk rep {rep + 1} {target.name:<20} {bulk.mb_per_s:7.0f} MB/s status {bulk.status}")


def measure_idle(
    targets: list[Target], root: Path, ca_file: str, results: dict[str, TargetResults], opts: Options
) -> None:
    """RSS of a fresh instance of each proxy before and while it holds `opts.idle_tunnels` idle tunnels."""
    if not opts.idle_tunnels:
        return
    for index, target in enumerate(targets):
        if target.fresh is None:
            continue
        log(f"holding {opts.idle_tunnels} idle tunnels through a fresh {target.name}")
        server = target.fresh(root / f"idle-{index}")
        try:
            time.sleep(1.0)  # let start-up garbage settle before the baseline
            results[target.name].idle = hold_idle_tunnels(
                server.proxy, ORIGIN_HOST, ca_file, opts.idle_tunnels, functools.partial(rss_mib, server.server.pid)
            )
        finally:
            server.stop()


def run_decision(mode: str) -> str:
    if mode == "skip":
        return ""
    with tempfile.NamedTemporaryFile(suffix=".md") as out:
        argv = [sys.executable, str(REPO / "bench" / "decision.py"), "--markdown", out.name]
        if mode == "quick":
            argv.insert(2, "--quick")
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            return f"bench/decision.py failed: {done.stderr[-300:]}"
        return Path(out.name).read_text()


def launch[T](stack: ExitStack, what: str, start: Callable[[], T]) -> T:
    """Start a server and register its `stop()` on `stack` (stopped in reverse order, also on errors)."""
    log(f"starting {what}")
    server = start()
    stack.callback(server.stop)  # type: ignore[attr-defined]
    return server


def main_table(targets: list[Target], results: dict[str, TargetResults], opts: Options) -> list[str]:
    c_mid = 16 if 16 in opts.concurrency else opts.concurrency[-1]
    c_lat = 1 if 1 in opts.concurrency else opts.concurrency[0]
    header = (
        ["path"]
        + [f"conn/s c={c}" for c in opts.concurrency]
        + [
            f"p50 ms c={c_lat}",
            f"p99 ms c={c_lat}",
            f"CPU s/1000 conns (c={c_mid})",
            "bulk MB/s",
            "CPU s/GB bulk",
            "peak RSS MiB",
            f"fresh process RSS MiB: before / {opts.idle_tunnels} idle tunnels",
            "KiB/tunnel",
            "processes",
        ]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target in targets:
        r = results[target.name]
        row = [target.name + (f" ({target.note})" if target.note else "")]
        for c in opts.concurrency:
            row.append(spread([s.load.conn_per_s for s in r.samples.get(c, [])]))
        lat = r.samples.get(c_lat, [])
        row.append(spread([s.load.p50_ms for s in lat], 2))
        row.append(spread([s.load.p99_ms for s in lat], 2))
        row.append(spread([s.cpu_per_1000 for s in r.samples.get(c_mid, [])], 2) if target.pid else "-")
        row.append(spread([b.mb_per_s for b, _ in r.bulk]))
        row.append(spread([cpu / (b.bytes / 1e9) for b, cpu in r.bulk if b.bytes], 2) if target.pid else "-")
        row.append(fmt(r.peak_rss_mib, 0) if target.pid else "-")
        if r.idle is not None:
            row.append(
                f"{r.idle.rss_before_mib:.0f} / {r.idle.rss_open_mib:.0f}"
                + (f" ({r.idle.failed} failed)" if r.idle.failed else "")
            )
            row.append(fmt(r.idle.kib_per_tunnel, 1))
        else:
            row += ["-", "-"]
        row.append(str(r.processes) if target.pid else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


@dataclass
class Medians:
    """Median figures of one run, by path name (NaN when a path or figure is missing)."""

    results: dict[str, TargetResults]
    c_mid: int
    c_lat: int

    def _med(self, name: str, get: Callable[[TargetResults], list[float]]) -> float:
        return median(get(self.results[name])) if name in self.results else float("nan")

    def cpu(self, name: str) -> float:
        return self._med(name, lambda r: [s.cpu_per_1000 for s in r.samples.get(self.c_mid, [])])

    def conn(self, name: str, c: int) -> float:
        return self._med(name, lambda r: [s.load.conn_per_s for s in r.samples.get(c, [])])

    def p50(self, name: str) -> float:
        return self._med(name, lambda r: [s.load.p50_ms for s in r.samples.get(self.c_lat, [])])

    def bulk(self, name: str) -> float:
        return self._med(name, lambda r: [b.mb_per_s for b, _ in r.bulk])

    def bulk_cpu_per_gb(self, name: str) -> float:
        return self._med(name, lambda r: [cpu / (b.bytes / 1e9) for b, cpu in r.bulk if b.bytes])


def medians(results: dict[str, TargetResults], opts: Options) -> Medians:
    c_mid = 16 if 16 in opts.concurrency else opts.concurrency[-1]
    c_lat = 1 if 1 in opts.concurrency else opts.concurrency[0]
    return Medians(results, c_mid, c_lat)


def summary(
    targets: list[Target], results: dict[str, TargetResults], reloads: list[ReloadResult], opts: Options
) -> list[str]:
    """The headline figures of this run in sentences (all derived from the tables below)."""
    m = medians(results, opts)
    names = [t.name for t in targets]
    out: list[str] = []
    if "gateway" in names and "squid" in names:
        cpu_ratio = m.cpu("gateway") / m.cpu("squid")
        verdict = "meets" if cpu_ratio <= 3 else "does not meet"
        out.append(
            f"CPU per connection (c={m.c_mid}): gateway {m.cpu('gateway'):.2f} ms, Squid {m.cpu('squid'):.2f} ms: "
            f"**{cpu_ratio:.1f}x Squid** ({verdict} the <= 3x milestone; goal <= 1.5x)."
        )
        out.append(
            f"Added p50 latency at c={m.c_lat} over direct ({m.p50('direct'):.2f} ms): Squid "
            f"+{m.p50('squid') - m.p50('direct'):.2f} ms, gateway +{m.p50('gateway') - m.p50('direct'):.2f} ms."
        )
        out.append(
            f"Bulk (100 MiB): gateway {m.bulk('gateway'):.0f} MB/s = {ratio(m.bulk('gateway'), m.bulk('direct'))} "
            f"direct, Squid {m.bulk('squid'):.0f} MB/s = {ratio(m.bulk('squid'), m.bulk('direct'))} direct; "
            f"CPU per GB gateway/Squid {ratio(m.bulk_cpu_per_gb('gateway'), m.bulk_cpu_per_gb('squid'))}."
        )
        idle_g, idle_s = results["gateway"].idle, results["squid"].idle
        if idle_g and idle_s:
            out.append(
                f"Idle tunnels: {idle_g.kib_per_tunnel:.0f} KiB each in the gateway, {idle_s.kib_per_tunnel:.0f} KiB "
                "each in Squid."
            )
    workers = [t.name for t in targets if t.name.startswith("gateway ") and ("workers" in t.name)]
    workers += [t.name for t in targets if t.name.endswith("gateway processes")]
    for name in workers:
        parts = [
            f"c={c}: {m.conn('gateway', c):.0f} -> {m.conn(name, c):.0f} conn/s "
            f"({ratio(m.conn(name, c), m.conn('gateway', c))})"
            for c in opts.concurrency
            if c >= 2
        ]
        out.append(
            f"'{name}' vs one: {'; '.join(parts)}; CPU per connection {ratio(m.cpu(name), m.cpu('gateway'))}. "
            "hey and nginx share the same 2 cores."
        )
    base = m.cpu("gateway")
    for name in names:
        if name.startswith("gateway, "):
            out.append(f"'{name}': {m.cpu(name):.2f} ms CPU per connection ({m.cpu(name) - base:+.2f} ms vs gateway).")
    for r in reloads:
        policies = f"{r.policies:,} polic{'y' if r.policies == 1 else 'ies'}"
        out.append(
            f"{policies} (files): ready after {r.ready_s:.1f} s, one file's change enforced after "
            f"{r.change_ms_median:.0f} ms (median), full reload {r.full_reload_s:.1f} s."
        )
    return [f"- {line}" for line in out]


def ratio_table(targets: list[Target], results: dict[str, TargetResults], opts: Options) -> list[str]:
    m = medians(results, opts)
    c_mid, c_lat = m.c_mid, m.c_lat
    cpu, conn, p50, bulk = m.cpu, m.conn, m.p50, m.bulk

    header = (
        ["path", f"CPU/conn vs Squid (c={c_mid})"]
        + [f"conn/s vs Squid c={c}" for c in opts.concurrency]
        + [
            f"conn/s vs direct c={c_mid}",
            f"added p50 ms vs direct (c={c_lat})",
            f"added p50 vs Squid (c={c_lat})",
            "bulk vs direct",
        ]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target in targets:
        if target.name == "direct":
            continue
        name = target.name
        added = p50(name) - p50("direct")
        squid_added = p50("squid") - p50("direct")
        row = [name, ratio(cpu(name), cpu("squid"))]
        row += [ratio(conn(name, c), conn("squid", c)) for c in opts.concurrency]
        row += [
            ratio(conn(name, c_mid), conn("direct", c_mid)),
            f"{added:+.2f}",
            ratio(added, squid_added),
            ratio(bulk(name), bulk("direct")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def detail_table(targets: list[Target], results: dict[str, TargetResults], opts: Options) -> list[str]:
    header = ["path", "c", "conn/s", "p50 ms", "p99 ms", "CPU s/1000 conns", "ok", "errors"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target in targets:
        for c in opts.concurrency:
            samples = results[target.name].samples.get(c, [])
            lines.append(
                "| "
                + " | ".join(
                    [
                        target.name,
                        str(c),
                        spread([s.load.conn_per_s for s in samples]),
                        spread([s.load.p50_ms for s in samples], 2),
                        spread([s.load.p99_ms for s in samples], 2),
                        spread([s.cpu_per_1000 for s in samples], 2) if target.pid else "-",
                        str(sum(s.load.ok for s in samples)),
                        str(sum(s.load.errors for s in samples)),
                    ]
                )
                + " |"
            )
    return lines


def reload_table(reloads: list[ReloadResult]) -> list[str]:
    header = ["policies", "rules", "ready s (exec -> /readyz)", "change -> enforced ms", "full reload s", "RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in reloads:
        lines.append(
            f"| {r.policies:,} | {1 + 4 * (r.policies - 1):,} | {r.ready_s:.2f} | {spread(r.change_ms, 0)} | "
            f"{r.full_reload_s:.2f} | {r.rss_mib:.0f} |"
        )
    return lines


def report(
    command: str,
    targets: list[Target],
    results: dict[str, TargetResults],
    reloads: list[ReloadResult],
    decision_md: str,
    profile_md: str,
    opts: Options,
    notes: list[str],
    elapsed_s: float,
) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [
        f"`{command}` ({when}, {elapsed_s / 60:.1f} min). Machine: {machine()}; {versions()}.",
        f"Each load run: `hey -z {opts.duration_s:g}s -c C -disable-keepalive` (every request = new connection: "
        f"CONNECT + TLS handshake + GET of a 3-byte body + close), {opts.reps} repetition(s) interleaved across paths; "
        "cells are median [min-max]. CPU is the proxy's whole process tree from /proc (utime+stime, children "
        "included) during the run, divided by the successful connections. The load generator, the origin and the "
        "proxy share the machine's cores, so connections/s at c>=16 measures the machine as much as the proxy; "
        "CPU per connection does not depend on that.",
        "",
        *summary(targets, results, reloads, opts),
        "",
        *main_table(targets, results, opts),
        "",
        "Ratios (medians of this run):",
        "",
        *ratio_table(targets, results, opts),
        "",
        "Per concurrency:",
        "",
        *detail_table(targets, results, opts),
    ]
    if reloads:
        out += [
            "",
            "Gateway policy reload (files source, 100 policies per file, 4 rules per policy):",
            "",
            *reload_table(reloads),
        ]
    if decision_md:
        out += ["", "Engine decision time (bench/decision.py, same run):", "", decision_md.strip()]
    if profile_md:
        out += [
            "",
            "Where the gateway's CPU per connection goes (bench/hotspots.py: py-spy --gil, gateway pinned to core 0, "
            "hey and nginx on the other core; microseconds = sample share x CPU per connection from /proc):",
            "",
            profile_md.strip(),
        ]
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Replace the generated block between the markers, or add it under a heading; other sections stay intact."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Gateway vs Squid vs direct (bench/run.py)\n\n" + block + "\n"
    path.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, one repetition, < 2 minutes")
    parser.add_argument("--reps", type=int, help="repetitions of every load run (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 5, quick 1.5)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated hey concurrencies")
    parser.add_argument("--idle-tunnels", type=int, help="idle tunnels held open for RSS (default 1000, quick 200)")
    parser.add_argument(
        "--reload-sizes", help="policy counts for the reload benchmark (default 1000,10000; quick 1000; '' to skip)"
    )
    parser.add_argument(
        "--workers", default="1", help="gateway process counts as rows; N > 1 runs N independent gateways (replicas)"
    )
    parser.add_argument(
        "--decision", choices=["full", "quick", "skip"], help="engine benchmark (default full, quick: quick)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        help="write the tables between the markers of this file (e.g. docs/benchmarks.md); default: print only",
    )
    parser.add_argument(
        "--profile", type=float, help="seconds of py-spy profile of the gateway under load (default 20; quick 0 = skip)"
    )
    parser.add_argument(
        "--no-variants", action="store_true", help="leave out the gateway rows without audit trail (not in --quick)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--origin-address", default="127.0.0.77", help="loopback address nginx listens on (:443)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs)")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    sizes = args.reload_sizes if args.reload_sizes is not None else ("1,1000" if quick else "1,1000,10000")
    return Options(
        reps=args.reps or (1 if quick else 3),
        duration_s=args.duration or (1.5 if quick else 5.0),
        concurrency=[int(c) for c in args.concurrency.split(",") if c],
        bulk_reps=1 if quick else 5,
        idle_tunnels=args.idle_tunnels if args.idle_tunnels is not None else (200 if quick else 1000),
        reload_sizes=[int(s) for s in sizes.split(",") if s],
        reload_flips=1 if quick else 3,
        workers=[int(w) for w in args.workers.split(",") if w],
        decision=args.decision or ("quick" if quick else "full"),
        profile_s=args.profile if args.profile is not None else (0 if quick else 20),
        variants=not args.no_variants and not quick,
    )


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = options_from(args)
    missing = missing_prerequisites(args.origin_address)
    if missing:
        print(
            f"bench/run.py: missing prerequisites: {', '.join(missing)} (see .ci/install-system-deps)", file=sys.stderr
        )
        return EXIT_MISSING
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    arguments = argv if argv is not None else sys.argv[1:]
    command = " ".join([str(python), "bench/run.py", *arguments])
    markdown = args.markdown  # only where asked: a run leaves the checkout as it was
    started_at = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    root.chmod(0o755)
    notes: list[str] = []
    results: dict[str, TargetResults] = {}
    targets: list[Target] = []
    reloads: list[ReloadResult] = []
    audit_files: dict[str, Path] = {}
    try:
        with ExitStack() as origin_stack:
            certs = make_certificates(root / "certs", [ORIGIN_HOST], [args.origin_address])
            origin = launch(
                origin_stack, "nginx", lambda: start_origin(root / "nginx", certs, ORIGIN_HOST, args.origin_address)
            )
            with ExitStack() as proxies:
                targets.append(Target("direct", None, None))
                squid = launch(
                    proxies, "squid", lambda: start_squid(root / "squid", certs, ORIGIN_HOST, args.origin_address)
                )
                squid_factory = functools.partial(
                    start_squid, certs=certs, hostname=ORIGIN_HOST, address=args.origin_address
                )
                targets.append(Target("squid", squid.proxy, squid.server.pid, fresh=squid_factory))
                for workers in opts.workers:
                    name = "gateway" if workers == 1 else f"{workers} gateway processes"
                    gateway = launch(
                        proxies,
                        name,
                        lambda w=workers: start_gateway(  # type: ignore[misc]
                            root / f"gateway-w{w}", ORIGIN_HOST, args.origin_address
                        ),
                    )
                    if workers > 1:
                        # No worker mode: run `workers` independent gateways on their own ports (like replicas)
                        # and split hey across them.
                        extra = [
                            launch(
                                proxies,
                                f"{name}: process {i + 1}",
                                functools.partial(
                                    start_gateway, root / f"gateway-w{workers}-{i}", ORIGIN_HOST, args.origin_address
                                ),
                            )
                            for i in range(1, workers)
                        ]
                        notes.append(
                            f"The row '{name}' runs {workers} independent gateways on separate ports (like replicas), "
                            "each driven by its own hey with c/workers (so no c=1 figure); CPU and memory are summed "
                            "over the processes."
                        )
                        more = [(g.proxy, g.server.pid) for g in extra]
                        targets.append(Target(name, gateway.proxy, gateway.server.pid, more=more))
                        continue
                    gateway_factory = functools.partial(
                        start_gateway, origin_host=ORIGIN_HOST, origin_address=args.origin_address
                    )
                    targets.append(Target(name, gateway.proxy, gateway.server.pid, fresh=gateway_factory))
                    audit_files[name] = gateway.audit_file
                if opts.variants:
                    # Configuration-only variants: what the audit trail and the decision log line cost, measured
                    # by /proc like every other row (the profile only samples).
                    for name, audit, level in (
                        ("gateway, no audit.file", False, "info"),
                        ("gateway, no audit.file, log.level warning", False, "warning"),
                    ):
                        variant = launch(
                            proxies,
                            name,
                            functools.partial(
                                start_gateway,
                                root / name.replace(" ", "-").replace(",", "").replace(".", "-"),
                                ORIGIN_HOST,
                                args.origin_address,
                                audit=audit,
                                log_level=level,
                            ),
                        )
                        targets.append(Target(name, variant.proxy, variant.server.pid))
                for target in targets:
                    results[target.name] = TargetResults()
                    results[target.name].processes = sum(len(process_tree(pid)) for pid in target.pids)
                measure_load(targets, origin, results, opts)
                measure_bulk(targets, origin, str(certs.ca_cert), results, opts)
                for target in targets:
                    if target.pid:
                        results[target.name].peak_rss_mib = sum(peak_rss_mib(pid) for pid in target.pids)
                measure_idle(targets, root, str(certs.ca_cert), results, opts)
            # The proxies are stopped now (the gateways flushed their batched audit spans on the way out), so the
            # reload runs do not compete with them for CPU.
            for name, audit_file in audit_files.items():
                results[name].audit_lines = _count_lines(audit_file)
            for size in opts.reload_sizes:
                log(f"gateway reload benchmark with {size:,} policies")
                reloads.append(
                    measure_reload(root / f"reload-{size}", ORIGIN_HOST, args.origin_address, size, opts.reload_flips)
                )
        log(f"engine decision benchmark ({opts.decision})")
        decision_md = run_decision(opts.decision)
        profile_md = ""
        if opts.profile_s > 0:
            if py_spy_binary() is None:
                notes.append("No profile: py-spy is not installed (`.venv/bin/pip install -e '.[bench]'`).")
            else:
                log(f"py-spy profile of the gateway under load ({opts.profile_s:g} s)")
                profile_md = profile_markdown(root / "profile", opts.profile_s, origin_address=args.origin_address)
        section = report(
            command, targets, results, reloads, decision_md, profile_md, opts, notes, time.monotonic() - started_at
        )
        print()
        print(section)
        if markdown:
            write_markdown(markdown, section)
            log(f"wrote {markdown}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "targets": [asdict(t) for t in targets],
                        "results": {
                            name: {
                                "samples": {
                                    c: [{"load": asdict(s.load), "cpu_s": s.cpu_s} for s in samples]
                                    for c, samples in r.samples.items()
                                },
                                "bulk": [
                                    {"bytes": b.bytes, "seconds": b.seconds, "status": b.status, "cpu_s": cpu}
                                    for b, cpu in r.bulk
                                ],
                                "peak_rss_mib": r.peak_rss_mib,
                                "idle": asdict(r.idle) if r.idle else None,
                                "processes": r.processes,
                                "audit_lines": r.audit_lines,
                            }
                            for name, r in results.items()
                        },
                        "reloads": [asdict(r) for r in reloads],
                        "notes": notes,
                    },
                    indent=1,
                    default=str,
                )
            )
    finally:
        if args.keep:
            print(f"working directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
