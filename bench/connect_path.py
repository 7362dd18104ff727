"""CPU per CONNECT of the gateway's own per-tunnel steps, in process, piece by piece (no sockets, no audit).

The pieces are built the way `egress-gateway run` builds them for `bench/run.py` (`bench/gateway.py`'s
configuration: static identity for 127.0.0.1, the origin's name in `resolver.hosts`, the realistic policy set of
`bench/policies.py`, ~1,000 rules), then each step an allowed tunnel takes is timed on its own:

- `read_head`: `GatewayAddon.read_head` on a typical CONNECT head (curl's: Host, User-Agent, Proxy-Connection);
- `admit`: `Admission.admit` for the allowed origin (readiness, identity, limits, the gate's decision, resolution
  from `resolver.hosts`, pinning, the own-address check);
- `decide_target`: `Gate.decide_target` alone (engine decision(s), resolution, pinning);
- `engine`: one `Engine.decide` with the pinned address;
- `own`: `OwnAddresses.dials_itself` for the pinned address on port 443;
- `start_tunnel`: `GatewayAddon.start_tunnel` on a real ClientHello (made by Python's `ssl` module for the origin
  name, ALPN h2 + http/1.1): a fresh `TunnelInspector` reads it, the SNI is re-decided (`Gate.decide_sni`); the
  record is a no-op;
- `clienthello`: `TunnelInspector.client_data` alone on the same bytes;
- `resolve_dns`: `Resolver.resolve` of a name whose DNS answer (TTL 300, from a responder on loopback) is cached:
  what each connection to a name outside `resolver.hosts` pays once the name was looked up;
- `tunnel`: one whole tunnel through a real `Listener` on loopback, one at a time: accept, CONNECT, 200, the
  ClientHello, the dial of the pinned address (an origin in this process on `ORIGIN_ADDRESS`:443 that answers one
  byte and closes), relay, close. The client and the origin run in the same process and are counted too (the same
  for every checkout); what differs between two checkouts is the session's own work: tasks, timers, callbacks.
  It runs `--number / 20` tunnels per sample.

Each piece runs `--number` calls per sample, `--repeat` samples interleaved across pieces (so a burst of load on
the shared machine hits every piece alike); the median (and min) microseconds of this process's CPU time
(`time.process_time`: user + system, so time the machine gives other processes is not counted) per call are
printed. The event loop is the gateway's (uvloop). Run with -O, as the gateway runs (mitmproxy type-checks its
dataclasses only without it):

    .venv/bin/python -O bench/connect_path.py [--number 2000] [--repeat 15] [--only read_head,admit]

To compare two checkouts, run this file from each in turn (A, B, A, B, ...) and compare medians of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import ipaddress
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from bench.gateway import gateway_config
from bench.policies import realistic_set
from egress_gateway.app import build_engine, build_identity, event_loop_factory
from egress_gateway.audit.recorder import ConnectionRecord, NullRecord
from egress_gateway.policy.decision import Facts
from egress_gateway.policy.engine import PolicySet
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object
from egress_gateway.proxy.addon import GatewayAddon, Timeouts, Tunnel
from egress_gateway.proxy.gate import Gate
from egress_gateway.proxy.listener import Listener
from egress_gateway.proxy.own import OwnAddresses
from egress_gateway.proxy.resolver import Resolver
from egress_gateway.settings import Settings, configured_own_addresses
from egress_gateway.wire.heads import HeadLimits
from egress_gateway.wire.inspection import TunnelInspector

ORIGIN = "origin.bench.test"
ORIGIN_ADDRESS = "127.0.0.93"  # a loopback address of its own: the `tunnel` piece listens on it, port 443
CLIENT = "127.0.0.1"
PROXY_PORT = 18080
ADMIN_PORT = 18081
HEAD = (
    f"CONNECT {ORIGIN}:443 HTTP/1.1\r\nHost: {ORIGIN}:443\r\nUser-Agent: curl/8.5.0\r\n"
    "Proxy-Connection: Keep-Alive\r\n\r\n"
).encode()


class _NoRecorder:
    """The recorder contract with no output: the audit path is `bench/audit_record.py`'s business."""

    def open(self, kind: str, client_address: str, client_port: int) -> ConnectionRecord:
        return NullRecord()

    def change_in_effect(self, change: str | None, policies: tuple[str, ...] = ()) -> None:
        pass

    def policies_in_force(self, policies: PolicySet) -> None:
        pass

    def shutdown(self) -> None:
        pass


class _Nameserver:
    """A DNS responder on loopback UDP answering every A query with 127.0.0.1, TTL 300 (dnspython's message API)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            data, peer = self.sock.recvfrom(4096)
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            if question.rdtype == dns.rdatatype.A:
                response.answer.append(
                    dns.rrset.from_text(question.name, 300, dns.rdataclass.IN, dns.rdatatype.A, "127.0.0.1")
                )
            self.sock.sendto(response.to_wire(), peer)


class _Origin(asyncio.Protocol):
    """The tunnel's destination: one byte back for the first bytes, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"x")  # type: ignore[attr-defined]
        self.transport.close()


class _Client(asyncio.Protocol):
    """CONNECT, then the ClientHello after the 200; done when the gateway closes."""

    def __init__(self, hello: bytes, done: asyncio.Future[None]) -> None:
        self.hello = hello
        self.done = done
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(HEAD)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.answered and data.startswith(b"HTTP/1.1 200"):
            self.answered = True
            self.transport.write(self.hello)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _no_plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: Any) -> None:
    writer.close()


def client_hello(server_name: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl module, default context) for `server_name`."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the ServerHello
        tls.do_handshake()
    return outgoing.read()


def build(workdir: Path) -> tuple[GatewayAddon, Gate, Settings]:
    config = gateway_config(workdir, workdir, ORIGIN, ORIGIN_ADDRESS, [], PROXY_PORT, ADMIN_PORT, audit=False)
    settings = Settings.model_validate(config)
    store = PolicyStore()
    for index, obj in enumerate(realistic_set(ORIGIN)):
        store.upsert(validate_object(obj), str(index))
    store.mark_loaded()
    engine = build_engine(settings)
    engine.policies = store.current
    identity, _ = build_identity(settings)
    resolver = Resolver(settings.resolver.hosts, settings.resolver.nameservers, settings.resolver.timeout_s)
    own = OwnAddresses(configured_own_addresses(settings), settings.own_ports)
    own.add_port(PROXY_PORT, "its proxy port")
    own.add_port(ADMIN_PORT, "its admin port")
    gate = Gate(engine, identity, resolver, ready=lambda: store.loaded, own=own)
    limits = settings.limits
    addon = GatewayAddon(
        gate,
        _NoRecorder(),
        Timeouts(),
        limits.max_connections,
        head_limits=HeadLimits(limits.max_request_line_bytes, limits.max_header_bytes, limits.max_headers),
        namespace_connections=limits.namespace_connections,
    )
    return addon, gate, settings


async def pieces(addon: GatewayAddon, gate: Gate) -> dict[str, Callable[[int], Any]]:
    """name -> a function running that piece n times (async pieces are awaited inside one coroutine)."""
    hello = client_hello(ORIGIN)
    facts = Facts(identity=None, target=ORIGIN, port=443)
    identity = await gate.identify(CLIENT, None)
    admission = addon.admission
    allowed = (await admission.admit("bench", CLIENT, None, facts, None)).verdict
    assert allowed.decision.allowed and allowed.address is not None, allowed.decision.message
    pinned = allowed.facts
    address = ipaddress.ip_address(ORIGIN_ADDRESS)
    head_limits = addon.head_limits
    tunnel_check = addon.start_tunnel(_tunnel(allowed, head_limits), hello)
    assert tunnel_check is True, "the ClientHello must open the tunnel"

    resolver = Resolver({}, [_Nameserver().address], 2)
    await resolver.resolve("dns.bench.test")

    loop = asyncio.get_running_loop()
    await loop.create_server(_Origin, ORIGIN_ADDRESS, 443)
    listener = Listener(addon, _no_plain_http, idle_timeout_s=600)
    listening = socket.create_server(("127.0.0.1", 0), backlog=128)
    listening.setblocking(False)
    await listener.start(listening)
    proxy_port = listening.getsockname()[1]

    async def tunnel(n: int) -> None:
        for _ in range(n):
            done: asyncio.Future[None] = loop.create_future()
            await loop.create_connection(functools.partial(_Client, hello, done), "127.0.0.1", proxy_port)
            await done

    async def resolve_dns(n: int) -> None:
        for _ in range(n):
            await resolver.resolve("dns.bench.test")

    async def admit(n: int) -> None:
        for _ in range(n):
            await admission.admit("bench", CLIENT, None, facts, None)

    async def decide_target(n: int) -> None:
        for _ in range(n):
            await gate.decide_target(identity, ORIGIN, 443)

    def read_head(n: int) -> None:
        for _ in range(n):
            addon.read_head("bench", HEAD)

    def engine(n: int) -> None:
        decide = gate.engine.decide
        for _ in range(n):
            decide(pinned)

    def own(n: int) -> None:
        dials_itself = gate.own.dials_itself
        for _ in range(n):
            dials_itself(address, 443)

    def start_tunnel(n: int) -> None:
        for _ in range(n):
            addon.start_tunnel(_tunnel(allowed, head_limits), hello)

    def clienthello(n: int) -> None:
        for _ in range(n):
            TunnelInspector(head_limits).client_data(hello)

    return {
        "read_head": read_head,
        "admit": admit,
        "decide_target": decide_target,
        "engine": engine,
        "own": own,
        "start_tunnel": start_tunnel,
        "clienthello": clienthello,
        "resolve_dns": resolve_dns,
        "tunnel": tunnel,
    }


def _tunnel(verdict: Any, head_limits: HeadLimits) -> Tunnel:
    return Tunnel(record=NullRecord(), verdict=verdict, inspector=TunnelInspector(head_limits))


CALLS_PER_SAMPLE = {"tunnel": 1 / 20}  # of --number


async def measure(only: list[str] | None, number: int, repeat: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        addon, gate, _ = build(Path(tmp))
        table = await pieces(addon, gate)
        names = [name for name in table if only is None or name in only]
        samples: dict[str, list[float]] = {name: [] for name in names}
        calls = {name: max(1, int(number * CALLS_PER_SAMPLE.get(name, 1))) for name in names}
        for name in names:  # warm-up: caches, lazily built views
            result = table[name](calls[name] // 10 or 1)
            if asyncio.iscoroutine(result):
                await result
        gc.collect()
        gc.disable()
        try:
            for _ in range(repeat):
                for name in names:
                    started = time.process_time()
                    result = table[name](calls[name])
                    if asyncio.iscoroutine(result):
                        await result
                    samples[name].append((time.process_time() - started) / calls[name] * 1e6)
        finally:
            gc.enable()
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per sample")
    parser.add_argument("--repeat", type=int, default=15, help="samples per piece (interleaved)")
    parser.add_argument("--only", help="comma-separated piece names")
    args = parser.parse_args()
    if __debug__:
        print("note: run with python -O, as the gateway runs (see the docstring)", file=sys.stderr)
    only = args.only.split(",") if args.only else None
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # uvloop, as the gateway runs
        samples = runner.run(measure(only, args.number, args.repeat))
    print(f"{'piece':<15} {'median us':>10} {'min us':>8}")
    for name, values in samples.items():
        print(f"{name:<15} {statistics.median(values):>10.2f} {min(values):>8.2f}")


if __name__ == "__main__":
    main()
