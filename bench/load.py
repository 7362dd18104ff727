"""Load and transfer measurements against one path (a proxy, or the origin directly), each bounded in time.

`hey_run`: new HTTPS connections (keep-alive off, so every request is CONNECT + TLS handshake + one small GET +
close), parsed from hey's summary. `bulk_run`: one download of the 100 MB file with curl. Imports nothing
from egress_gateway.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadResult:
    ok: int
    errors: int
    seconds: float
    conn_per_s: float
    p50_ms: float
    p99_ms: float


def hey_binary() -> str | None:
    return shutil.which("hey")


def parse_hey_summary(text: str) -> LoadResult:
    """hey's summary: `Total: S secs`, `50% in S secs`, `[200] N responses`, and `[N] error` lines for failures.

    Its CSV mode lists successful requests only, so transport errors (a refused CONNECT is one for Go) would vanish.
    """
    total_match = re.search(r"Total:\s+([\d.]+) secs", text)
    total = float(total_match.group(1)) if total_match else float("nan")
    quantiles = {int(q): float(v) * 1000 for q, v in re.findall(r"(\d+)%+ in ([\d.]+) secs", text)}
    ok = errors = 0
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("distribution:"):
            section = stripped
            continue
        match = re.match(r"\[(\d+)\]\s+(\d+)", stripped)
        if match and section.startswith("Status code"):
            if match.group(1) == "200":
                ok += int(match.group(2))
            else:
                errors += int(match.group(2))
        elif section.startswith("Error") and (match := re.match(r"\[(\d+)\]", stripped)):
            errors += int(match.group(1))
    return LoadResult(
        ok=ok,
        errors=errors,
        seconds=total,
        conn_per_s=ok / total if ok and total > 0 else 0.0,
        p50_ms=quantiles.get(50, float("nan")),
        p99_ms=quantiles.get(99, float("nan")),
    )


def hey_run(
    url: str,
    concurrency: int,
    duration_s: float,
    *,
    proxy: str | None,
    host_header: str | None,
    timeout_s: float = 10,
    cpus: str | None = None,
) -> LoadResult:
    hey = hey_binary()
    if hey is None:
        raise RuntimeError("hey is not installed (Debian: apt-get install hey)")
    argv = [
        hey,
        "-z",
        f"{duration_s}s",
        "-c",
        str(concurrency),
        "-t",
        str(int(timeout_s)),
        "-disable-keepalive",
        "-disable-compression",
    ]
    if proxy:
        argv += ["-x", proxy]
    if host_header:
        argv += ["-host", host_header]
    argv.append(url)
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    # Requests still in flight at the end of -z get up to -t seconds; add slack for hey's own start and exit.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {done.stderr[-500:]}")
    return parse_hey_summary(done.stdout)


@dataclass(frozen=True)
class BulkResult:
    bytes: int
    seconds: float
    status: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def bulk_run(url: str, ca_file: str, *, proxy: str | None, resolve: str | None, timeout_s: float = 120) -> BulkResult:
    argv = [
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        str(int(timeout_s)),
        "--cacert",
        ca_file,
        "--no-keepalive",
        "-w",
        "%{http_code} %{size_download} %{time_total}",
    ]
    if proxy:
        argv += ["-x", proxy]
    if resolve:
        argv += ["--resolve", resolve]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 15)
    status, size, total = done.stdout.split()
    return BulkResult(int(size), float(total), int(status))
