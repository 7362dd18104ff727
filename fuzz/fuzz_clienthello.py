"""Coverage-guided fuzzing (atheris) of the ClientHello/SNI parsing path, the incremental reader, the tunnel
inspector and the engine's SNI handling.

Contract under test: for any bytes, `parse_client_hello` returns None (needs more data), a `ClientHello`, or raises
`InvalidClientHello`; any other exception is a bug. A tunnel's incremental reader (`TunnelInspector`) fed the same
bytes split at points derived from the input (deterministic, so a crash reproduces) must report exactly the
one-shot result first (issue 12, class 8), never raise (server bytes included) and never release more bytes than
it was given. A parsed SNI is then fed to the engine as a tunnel would be, which must return a Decision and never
raise.
Run: `.venv/bin/python fuzz/fuzz_clienthello.py fuzz/corpus/clienthello -max_total_time=60`.
"""

from __future__ import annotations

import ipaddress
import random
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris
import mitmproxy.net.http.http1  # noqa: F401  (imported uninstrumented: only our code is fuzzed)

with atheris.instrument_imports():
    from egress_gateway.policy.decision import Facts, Identity
    from egress_gateway.policy.engine import Engine
    from egress_gateway.wire.clienthello import (
        ClientHello,
        InvalidClientHello,
        parse_client_hello,
        starts_like_tls,
    )
    from egress_gateway.wire.heads import HeadLimits
    from egress_gateway.wire.inspection import TunnelInspector

ENGINE = Engine()
IDENTITY = Identity("fuzz")
PUBLIC = ipaddress.ip_address("93.184.216.10")
LIMITS = HeadLimits()


def pieces(data: bytes) -> list[bytes]:
    rng = random.Random(zlib.crc32(data))
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def one_shot(data: bytes) -> ClientHello | type[InvalidClientHello] | None:
    try:
        return parse_client_hello(data)
    except InvalidClientHello:
        return InvalidClientHello


def test_one_input(data: bytes) -> None:
    starts_like_tls(data)
    hello = one_shot(data)
    split = pieces(data)
    inspector = TunnelInspector(LIMITS)
    with_server = TunnelInspector(LIMITS)  # also shown server bytes (which may end the inspection): never a crash
    first: ClientHello | type[InvalidClientHello] | None = None
    reported = False
    released = 0
    for piece in split:
        step = inspector.client_data(piece)
        released += len(step.release)
        if step.seen and not reported:
            reported = True
            first = step.seen[0].hello if step.seen[0].problem is None else InvalidClientHello
        with_server.client_data(piece)
        with_server.server_data(piece[::-1])
    if released > len(data):
        raise AssertionError("the inspector released more bytes than it was given")
    if starts_like_tls(data) and first != hello:
        raise AssertionError(f"incremental {first!r} != one-shot {hello!r} for cuts {[len(p) for p in split]}")
    if isinstance(hello, ClientHello) and hello.sni is not None:
        ENGINE.decide(Facts(IDENTITY, "api.example.com", 443, sni=hello.sni, destination_ip=PUBLIC))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
