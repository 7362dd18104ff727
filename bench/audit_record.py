"""CPU per connection record of the audit trail, in process: the recorder the app builds, driven like a tunnel.

Builds the recorder as `egress-gateway run` does (`egress_gateway.audit.build_recorder` from `Settings`, built-in
rotation off, logging set up by `egress_gateway.logging.setup_logging`, Prometheus metrics on the default registry),
then replays the proxy's per-tunnel call sequence (proxy/addon.py: open, set server, set peer, event decided,
decided, set TLS, event client_hello, decided, event upstream_connected, event closed, close) N times and prints CPU
microseconds per record (`time.process_time`, which covers every thread, so the trail writer's thread is included; the
clock stops after a final `force_flush`). Four configurations:

- `spans`: the connection records and metrics, no trail file, no OTLP exporter, no decision log line;
- `+jsonl`: plus the JSON-lines trail file (a temporary file);
- `+log`: spans plus the decision log line (JSON, to /dev/null), no exporter;
- `all`: spans, trail file and log line.

How the export thread gets the GIL matters. By default the loop behaves like an event loop that waits for I/O:
every 16 records it idles (sleeps, no CPU) while the trail thread has a full batch or is writing, so it writes every
batch without competing. `--busy` models a loop that never idles: the export thread is then starved (every time the
loop releases the GIL for the decision line's write it is woken and loses the race, and CPython's forced switch
never fires because the GIL keeps changing hands), so the loop calls `force_flush` every 1000 records itself and
the figures include the futile wake-ups of the export thread (about 10 us per record on the 2-core test machine).

Each configuration runs `--repeat` times (median reported, with min and max). The machine is shared: compare
figures only within one run.

    .venv/bin/python bench/audit_record.py [--records 20000] [--repeat 5] [--only all] [--busy]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import REGISTRY

from egress_gateway.audit import build_recorder, spans
from egress_gateway.audit.spans import SpanRecorder
from egress_gateway.logging import setup_logging
from egress_gateway.policy.decision import Decision, Facts, Identity, PolicyRef, Reason
from egress_gateway.settings import AuditSettings, Settings

FLUSH_EVERY = 1000  # --busy: well below the default audit.max_queue_size (8192)
IDLE_EVERY = 16  # default: how often the loop lets a busy export thread finish its batch
CONFIGURATIONS: dict[str, tuple[bool, bool]] = {  # name -> (trail file, decision log line)
    "spans": (False, False),
    "+jsonl": (True, False),
    "+log": (False, True),
    "all": (True, True),
}

IDENTITY = Identity(
    namespace="shop",
    pod="payments-7d9f8c6b5-x2kqz",
    labels=MappingProxyType({"app": "payments", "pod-template-hash": "7d9f8c6b5", "tier": "backend"}),
    namespace_labels=MappingProxyType({"kubernetes.io/metadata.name": "shop", "team": "payments"}),
)
POLICY = PolicyRef(kind="EgressPolicy", namespace="shop", name="payments", version="sha256:0494fe3bb5bb")
HOST = "api.stripe.com"
PEER = ipaddress.ip_address("93.184.216.34")
PEER_TEXT = str(PEER)  # the proxy's own work, not the recorder's
CONNECT_FACTS = Facts(identity=IDENTITY, target=HOST, port=443, destination_ip=PEER)
SNI_FACTS = Facts(identity=IDENTITY, target=HOST, port=443, sni=HOST, destination_ip=PEER)
DECISION = Decision(
    allowed=True,
    reason=Reason.ALLOWED_BY_RULE,
    message=f"{HOST}:443 is allowed by rule 'stripe-api' of EgressPolicy/shop/payments (matched {HOST})",
    policy=POLICY,
    rule="stripe-api",
    matched=HOST,
)


def one_tunnel(recorder: SpanRecorder, port: int) -> None:
    """The calls proxy/addon.py makes on one allowed CONNECT tunnel, in its order."""
    record = recorder.open("CONNECT", "10.244.1.17", port)
    record.set(server_address=HOST, server_port=443)
    record.set(network_peer_address=PEER_TEXT)
    record.event("decided", duration_s=0.000123)
    record.decided(CONNECT_FACTS, DECISION)
    record.set(tls=True, tls_client_server_name=HOST, tls_alpn=("h2", "http/1.1"), tls_ech=False)
    record.event("client_hello")
    record.decided(SNI_FACTS, DECISION)
    record.event("upstream_connected")
    record.event("closed")
    record.close(bytes_sent=731, bytes_received=1828)


def _dropped() -> float:
    name = "egress_gateway_span_export_dropped_total"
    return sum(
        REGISTRY.get_sample_value(name, {"exporter": "file", "reason": reason}) or 0.0
        for reason in ("queue_full", "export_failed")
    )


def _idle_while_writing(recorder: SpanRecorder) -> None:
    """Sleep (no CPU, GIL released) while the trail thread has a batch to write, like a loop waiting for I/O."""
    trail = recorder.trail
    while trail is not None and trail.busy():
        time.sleep(0.0002)


def measure(recorder: SpanRecorder, records: int, trail: Path | None, *, busy: bool) -> float:
    """CPU microseconds per record for one pass of `records` tunnels, export thread included."""
    if trail is not None:
        os.truncate(trail, 0)
    gc.collect()
    started = time.process_time()
    for index in range(records):
        one_tunnel(recorder, 30000 + index % 30000)
        if busy:
            if index % FLUSH_EVERY == FLUSH_EVERY - 1:
                recorder.force_flush()  # the starved export thread would let the bounded queue drop spans
        elif index % IDLE_EVERY == IDLE_EVERY - 1:
            _idle_while_writing(recorder)
    recorder.force_flush()
    elapsed = time.process_time() - started
    return elapsed / records * 1e6


def run(name: str, records: int, repeat: int, workdir: Path, *, busy: bool) -> list[float]:
    with_trail, with_log = CONFIGURATIONS[name]
    trail = workdir / f"audit-{name.strip('+')}.jsonl" if with_trail else None
    # No built-in rotation: at the default 100 MiB a pass of 20000 records would rotate and gzip the file once, and
    # the figures would depend on where that boundary falls (and the line check below would see only the live file).
    recorder = build_recorder(Settings(audit=AuditSettings(file=trail, rotate_bytes=0)))
    original: Callable[..., Any] = spans.log_decision
    if not with_log:
        spans.log_decision = lambda *args, **kwargs: None
    try:
        one_tunnel(recorder, 1)  # warm-up: caches, lazily built state
        recorder.force_flush()
        dropped = _dropped()
        figures = [measure(recorder, records, trail, busy=busy) for _ in range(repeat)]
        if _dropped() != dropped:
            print(f"warning: {name}: spans were dropped, the figures undercount the trail", file=sys.__stdout__)
        if trail is not None:
            lines = sum(1 for line in trail.open(encoding="utf-8") if '"recordType":' not in line)  # not checkpoints
            if lines != records:
                print(f"warning: {name}: {lines} trail lines for {records} records", file=sys.__stdout__)
    finally:
        spans.log_decision = original
        recorder.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--records", type=int, default=20_000, help="tunnels per repetition (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per configuration (default 5)")
    parser.add_argument("--only", choices=sorted(CONFIGURATIONS), action="append", help="run only these")
    parser.add_argument("--busy", action="store_true", help="a loop that never idles (see the module docstring)")
    args = parser.parse_args()
    if not 1 <= args.records <= 1_000_000 or not 1 <= args.repeat <= 50:
        parser.error("--records must be 1..1000000 and --repeat 1..50")
    names = args.only or list(CONFIGURATIONS)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp, open(os.devnull, "w") as devnull:
        saved, sys.stderr = sys.stderr, devnull  # the decision log lines go to the stderr in place when configured
        try:
            setup_logging("info", "json")  # as `egress-gateway run` does with the default settings
            for name in names:
                results[name] = run(name, args.records, args.repeat, Path(tmp), busy=args.busy)
        finally:
            sys.stderr = saved
    loop = "busy loop" if args.busy else "loop idles while the export thread writes"
    print(f"CPU us per tunnel record ({args.records} records, {loop}, median of {args.repeat}; min-max)")
    for name in names:
        figures = results[name]
        print(f"  {name:<7} {statistics.median(figures):7.1f}   ({min(figures):.1f}-{max(figures):.1f})")


if __name__ == "__main__":
    main()
