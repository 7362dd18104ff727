"""Coverage-guided fuzzing (atheris) of the ClientHello/SNI parsing path and the engine's SNI handling.

Contract under test: for any bytes, `parse_client_hello` returns None (needs more data), a `ClientHello`, or raises
`InvalidClientHello`; any other exception is a bug. A parsed SNI is then fed to the engine as a tunnel would be,
which must return a Decision and never raise.
Run: `.venv/bin/python fuzz/fuzz_clienthello.py fuzz/corpus/clienthello -max_total_time=60`.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris

with atheris.instrument_imports():
    from egress_gateway.policy.decision import Facts, Identity
    from egress_gateway.policy.engine import Engine
    from egress_gateway.proxy.clienthello import InvalidClientHello, parse_client_hello, starts_like_tls

ENGINE = Engine()
IDENTITY = Identity("fuzz")
PUBLIC = ipaddress.ip_address("203.0.113.10")


def test_one_input(data: bytes) -> None:
    starts_like_tls(data)
    try:
        hello = parse_client_hello(data)
    except InvalidClientHello:
        return
    if hello is not None and hello.sni is not None:
        ENGINE.decide(Facts(IDENTITY, "api.example.com", 443, sni=hello.sni, destination_ip=PUBLIC))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
