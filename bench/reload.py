"""Policy reload costs of the gateway with N policies from the files source (100 policies per YAML file).

- `ready s`: from starting the process to `/readyz` answering 200 (interpreter start + loading every policy).
- `change -> enforced ms`: one file is atomically replaced so that the load generator's policy gains (then loses)
  a rule; a CONNECT probe polls every 10 ms until the gateway's answer flips (403 <-> 200).
- `full reload s`: every file rewritten at once (a label changes); time until the gateway logged that it loaded
  all of them (its own log timestamps).
Imports nothing from egress_gateway.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.gateway import Gateway, time_to_ready
from bench.policies import allow_rule, bulk_set
from bench.procs import rss_mib, wait_until

LATE_HOST = "late.bench.test"
PER_FILE = 100


@dataclass(frozen=True)
class ReloadResult:
    policies: int
    ready_s: float
    change_ms: list[float]
    full_reload_s: float
    rss_mib: float

    @property
    def change_ms_median(self) -> float:
        return statistics.median(self.change_ms) if self.change_ms else float("nan")


def connect_status(port: int, host: str, timeout_s: float = 5) -> int:
    """The status code the proxy answers to `CONNECT host:443` (then the connection is dropped)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            head += chunk
    return int(head.split(b" ", 2)[1])


def _replace(path: Path, objects: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")  # not *.yaml: the source ignores it until the rename
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    os.replace(tmp, path)


def _loaded_events(log: Path) -> list[float]:
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if '"policy_file_loaded"' not in line:
            continue
        try:
            stamp = json.loads(line)["timestamp"]
        except (ValueError, KeyError):
            continue
        times.append(datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return times


def _flip(gateway: Gateway, first_file: Path, objects: list[dict[str, Any]], allow: bool, timeout_s: float) -> float:
    changed = copy.deepcopy(objects)
    if allow:
        changed[0]["spec"]["rules"].append(allow_rule("late", LATE_HOST))
    want = 200 if allow else 403
    started = time.monotonic()
    _replace(first_file, changed)
    wait_until(
        lambda: connect_status(gateway.port, LATE_HOST) == want,
        timeout_s,
        f"the gateway to answer {want} for {LATE_HOST}",
        interval_s=0.01,
    )
    return (time.monotonic() - started) * 1000


def measure_reload(
    root: Path, origin_host: str, origin_address: str, count: int, flips: int, timeout_s: float = 300
) -> ReloadResult:
    objects = bulk_set(count, origin_host)
    gateway, ready_s = time_to_ready(root, origin_host, origin_address, objects, timeout_s=timeout_s)
    try:
        first_file = gateway.policies / "policies-00000.yaml"
        first_objects = objects[:PER_FILE]
        if connect_status(gateway.port, LATE_HOST) != 403:
            raise RuntimeError(f"{LATE_HOST} should be denied before the change")
        change_ms = []
        for i in range(flips):
            change_ms.append(_flip(gateway, first_file, first_objects, allow=True, timeout_s=60))
            if i + 1 < flips:
                _flip(gateway, first_file, first_objects, allow=False, timeout_s=60)
        time.sleep(0.5)
        before = len(_loaded_events(gateway.server.log))
        files = sorted(gateway.policies.glob("policies-*.yaml"))
        started = time.time()
        for index, path in enumerate(files):
            chunk = copy.deepcopy(objects[index * PER_FILE : (index + 1) * PER_FILE])
            for obj in chunk:
                obj["metadata"]["labels"] = {"revision": "2"}
            _replace(path, chunk)
        wait_until(
            lambda: len(_loaded_events(gateway.server.log)) >= before + len(files),
            timeout_s,
            "the gateway to reload every policy file",
            interval_s=0.2,
        )
        full_reload_s = max(_loaded_events(gateway.server.log)[before:]) - started
        return ReloadResult(count, ready_s, change_ms, full_reload_s, rss_mib(gateway.server.pid))
    finally:
        gateway.stop()
