"""Where the gateway's per-connection CPU goes: py-spy samples the running gateway while hey drives new connections.

Starts nginx and the gateway exactly as bench/run.py does, runs `hey -c C -disable-keepalive` for the sampling
window, records with `py-spy record --format raw` (collapsed stacks), then prints: CPU microseconds per connection
(from /proc), and per component (by the file of the innermost frame: our modules by subpackage, libraries by
name) both self time and inclusive time, plus the top self-time functions. Needs root for ptrace, py-spy
(`pip install py-spy`), nginx and hey.

    .venv/bin/python bench/hotspots.py [--seconds 20] [--concurrency 16] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.certs import make_certificates
from bench.gateway import start_gateway
from bench.load import LoadResult, hey_run
from bench.origin import start_origin
from bench.procs import cpu_user_system

ORIGIN_HOST = "origin.bench.test"
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Profile:
    samples: int
    idle_samples: int
    rate: int
    connections: int
    cpu_s: float
    self_by_component: dict[str, int]
    inclusive_by_component: dict[str, int]
    self_by_function: dict[str, int]
    buckets: dict[str, int]
    user_s: float
    system_s: float


def component(file: str) -> str:
    """Module group of a frame's file (py-spy --full-filenames): `egress_gateway.proxy`, `mitmproxy.proxy.layers`,
    `opentelemetry`, `stdlib:asyncio`, ..."""
    path = file.replace("\\", "/")
    if "egress_gateway/" in path:
        parts = path.rsplit("egress_gateway/", 1)[1].split("/")
        return "egress_gateway." + parts[0].removesuffix(".py")
    if "site-packages/" in path:
        parts = path.split("site-packages/", 1)[1].split("/")
        if parts[0] == "mitmproxy" and len(parts) > 2:
            depth = 3 if parts[1] == "proxy" and parts[2] == "layers" else 2
            return ".".join(p.removesuffix(".py") for p in parts[:depth])
        return parts[0].removesuffix(".py")
    match = re.search(r"python3\.\d+/(.+?)(?:\.py)?$", path)
    if match:
        return "stdlib:" + ".".join(match.group(1).split("/")[:2]).removesuffix(".__init__")
    return "other:" + path.rsplit("/", 1)[-1]


# Exclusive buckets for the summary. A stack that passes through the audit code, the engine or identity belongs
# to them whatever its innermost frame (the span's JSON encoding counts as audit). Otherwise the innermost frame
# decides, with standard-library helpers (uuid, dataclasses, abc) charged to the code that called them, so
# mitmproxy's work under our layer subclasses counts as mitmproxy and only our own frames count as ours.
CALLER_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (
        "audit: span, JSON-lines export, decision log line",
        (
            "egress_gateway.audit",
            "egress_gateway.logging",
            "opentelemetry",
            "structlog",
            "google",
            "stdlib:json",
            "stdlib:logging",
        ),
    ),
    ("policy engine", ("egress_gateway.policy",)),
    ("identity", ("egress_gateway.identity",)),
]
OWNER_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("asyncio streams: socket reads/writes, incl. the syscalls", ("stdlib:asyncio.streams",)),
    ("event loop: uvloop C code, tasks, futures", ("stdlib:asyncio", "uvloop")),
    ("our proxy code: listener, addon, gate, layers, resolver, ClientHello parser", ("egress_gateway",)),
    ("mitmproxy: layers, hook dispatch, connection objects", ("mitmproxy",)),
]
_HELPERS = ("stdlib:", "other:")  # charged to their caller

# Leaf frames where py-spy --gil still reports a thread although it waits: the watchfiles thread (anyio) blocked in
# Rust (the idle gateway uses 0.2% CPU). Left out of the shares.
IDLE_LEAVES = ("WorkerThread.run",)


def bucket(components: list[str]) -> str:
    for name, prefixes in CALLER_BUCKETS:
        if any(c.startswith(prefixes) for c in components):
            return name
    for owner in reversed(components):
        for name, prefixes in OWNER_BUCKETS:
            if owner.startswith(prefixes):
                return name
        if not owner.startswith(_HELPERS):
            return f"other libraries ({owner})"
    return "other"


def _below_loop(frames: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Frames under the event loop (or a thread's run()): what the process does, not how it was started."""
    cut = 0
    for index, (func, file) in enumerate(frames):
        if func in ("Runner.run", "run_forever", "BaseEventLoop.run_forever", "Thread.run") or file.endswith(
            "threading.py"
        ):
            cut = index + 1
    return frames[cut:] or frames[-1:]


def parse_collapsed(text: str) -> tuple[int, int, dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    total = idle = 0
    self_comp: collections.Counter[str] = collections.Counter()
    incl_comp: collections.Counter[str] = collections.Counter()
    self_func: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        for raw in stack.split(";"):
            match = FRAME.match(raw.strip())
            if match:
                frames.append((match.group("func"), match.group("file")))
        if not frames:
            continue
        if frames[-1][0] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        frames = _below_loop(frames)
        components = [component(f) for _, f in frames]
        func = frames[-1][0]
        self_comp[components[-1]] += count
        self_func[f"{func} ({components[-1]})"] += count
        for name in set(components):
            incl_comp[name] += count
        buckets[bucket(components)] += count
    return total, idle, dict(self_comp), dict(incl_comp), dict(self_func), dict(buckets)


def record(
    seconds: float,
    concurrency: int,
    rate: int,
    workdir: Path,
    gateway_cpus: str | None,
    load_cpus: str | None,
    origin_address: str = "127.0.0.78",
) -> tuple[Profile, LoadResult]:
    py_spy = py_spy_binary()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install -e '.[bench]')")
    certs = make_certificates(workdir / "certs", [ORIGIN_HOST], [origin_address])
    # The gateway gets core 0 to itself, nginx and hey share the other: a sampled thread that is runnable but
    # preempted (e.g. right after its write woke the client) would otherwise be counted as busy in that write.
    origin = start_origin(workdir / "nginx", certs, ORIGIN_HOST, origin_address, cpus=load_cpus)
    try:
        gateway = start_gateway(workdir / "gateway", ORIGIN_HOST, origin_address, cpus=gateway_cpus)
        try:
            hey_run(origin.tiny_url, concurrency, 2, proxy=gateway.proxy, host_header=None, cpus=load_cpus)  # warm-up
            out = workdir / "profile.txt"
            loads: list[LoadResult] = []
            load = threading.Thread(
                target=lambda: loads.append(
                    hey_run(
                        origin.tiny_url, concurrency, seconds + 2, proxy=gateway.proxy, host_header=None, cpus=load_cpus
                    )
                )
            )
            user_before, system_before = cpu_user_system(gateway.server.pid)
            load.start()
            spy = subprocess.run(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(gateway.server.pid),
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                    "--full-filenames",
                ],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
            load.join(seconds + 60)
            user_after, system_after = cpu_user_system(gateway.server.pid)
            user, system = user_after - user_before, system_after - system_before
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {spy.stderr[-500:]}")
            total, idle, self_comp, incl_comp, self_func, buckets = parse_collapsed(out.read_text())
            result = loads[0]
            profile = Profile(
                total, idle, rate, result.ok, user + system, self_comp, incl_comp, self_func, buckets, user, system
            )
            return profile, result
        finally:
            gateway.stop()
    finally:
        origin.stop()


def render(profile: Profile, load: LoadResult, concurrency: int, seconds: float, top: int = 25) -> str:
    """Shares come from the samples; microseconds per connection = share x the gateway's CPU per connection from
    /proc. Sample time itself is not CPU time: py-spy counts a runnable thread as busy while it waits for a core."""
    cpu_us = profile.cpu_s / load.ok * 1e6 if load.ok else float("nan")

    def share(samples: int) -> str:
        return f"{100 * samples / profile.samples:.1f}"

    def us(samples: int) -> str:
        return f"{cpu_us * samples / profile.samples:.0f}"

    lines = [
        f"`hey -c {concurrency} -disable-keepalive` for {seconds + 2:g} s: {load.ok} connections "
        f"({load.conn_per_s:.0f}/s, {load.errors} errors). Gateway CPU from /proc: {cpu_us:.0f} us per connection "
        f"({1e6 * profile.user_s / load.ok:.0f} user + {1e6 * profile.system_s / load.ok:.0f} system). "
        f"py-spy --gil: {profile.samples} samples at {profile.rate} Hz over {seconds:g} s"
        f" ({profile.idle_samples} more in idle waits, left out).",
        "",
        "| where the CPU goes (exclusive buckets) | share % | us per connection |",
        "|---|---|---|",
    ]
    for name, count in sorted(profile.buckets.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {share(count)} | {us(count)} |")
    lines += ["", "| module group | self % | inclusive % | inclusive us/conn |", "|---|---|---|---|"]
    for name in sorted(profile.inclusive_by_component, key=lambda n: -profile.inclusive_by_component[n])[:top]:
        incl = profile.inclusive_by_component[name]
        lines.append(f"| {name} | {share(profile.self_by_component.get(name, 0))} | {share(incl)} | {us(incl)} |")
    lines += ["", "| function (module group), by self time | self % | us/conn |", "|---|---|---|"]
    for func, count in sorted(profile.self_by_function.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {func} | {share(count)} | {us(count)} |")
    return "\n".join(lines) + "\n"


def py_spy_binary() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def profile_markdown(
    workdir: Path, seconds: float, concurrency: int = 16, rate: int = 250, origin_address: str = "127.0.0.78"
) -> str:
    """Record and render; the gateway pinned to core 0 and the load to the others when there are two or more."""
    pin = (os.cpu_count() or 1) >= 2
    profile, load = record(
        seconds,
        concurrency,
        rate,
        workdir,
        "0" if pin else None,
        f"1-{(os.cpu_count() or 2) - 1}" if pin else None,
        origin_address,
    )
    return render(profile, load, concurrency, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--markdown", type=Path, help="write the tables to this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateway and the load to separate cores")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (raw profile, logs)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="egress-profile-"))
    workdir.chmod(0o755)
    try:
        pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
        profile, load = record(
            args.seconds,
            args.concurrency,
            args.rate,
            workdir,
            "0" if pin else None,
            f"1-{(os.cpu_count() or 2) - 1}" if pin else None,
        )
        text = render(profile, load, args.concurrency, args.seconds)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
    finally:
        if args.keep:
            print(f"working directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
