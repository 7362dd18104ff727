"""Coverage-guided fuzzing (atheris) of the proxy's request-head path: the bytes a client sends before any decision.

Contract under test, for any bytes: the head checks of `wire/heads.py` (size/count limits, request-line bytes,
framing) return a verdict and never raise; a head they accept parses with mitmproxy's HTTP/1 reader or fails with
ValueError only (what the addon turns into 400 bad_request); an accepted CONNECT/absolute-form target normalizes to
a name or an IP, or fails with InvalidTarget only; every refusal maps to a status the responses module knows; and the
common-CONNECT path of `wire/request_head.py` answers only where the full checks accept, with the same Request.
Run: `.venv/bin/python fuzz/fuzz_request_head.py fuzz/corpus/request_head -max_total_time=60`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

import atheris

with atheris.instrument_imports():
    from mitmproxy import http
    from mitmproxy.net.http import http1
    from mitmproxy.net.http.validate import validate_headers

    from egress_gateway.policy.errors import InvalidTarget
    from egress_gateway.policy.targets import normalize_host
    from egress_gateway.wire.heads import (
        HeadLimits,
        check_request_head,
        complete_head_lines,
        framing_problem,
        request_line_problem,
    )
    from egress_gateway.wire.request_head import read_common_connect, read_head_in_full

LIMITS = HeadLimits(max_request_line_bytes=512, max_header_bytes=2048, max_headers=16)


def test_one_input(data: bytes) -> None:
    fast = read_common_connect(data, LIMITS)
    if fast is not None:
        full = read_head_in_full(data, LIMITS)
        assert isinstance(full, http.Request), full
        assert (fast.host, fast.port, fast.authority, fast.http_version, fast.headers.fields) == (
            full.host,
            full.port,
            full.authority,
            full.http_version,
            full.headers.fields,
        )
    problem = check_request_head(data, LIMITS)
    if problem is not None:
        assert problem.status in (414, 431)
        return
    if request_line_problem(data) is not None:
        return
    lines = complete_head_lines(data)
    if lines is None or framing_problem(lines) is not None:
        return
    try:
        request = http1.read_request_head(lines)
        validate_headers(request)
        http1.expected_http_body_size(request)
    except ValueError:
        return
    if request.host:
        with contextlib.suppress(InvalidTarget):
            normalize_host(request.host)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
