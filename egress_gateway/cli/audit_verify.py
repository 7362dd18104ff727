"""`egress-gateway audit verify FILE...`: check the trail's hash chain (see docs/audit.md, "Tamper evidence").

Prints every break with the file, line, instance and sequence number of the record, then a summary.
Exit codes: 0 the chain is intact; 1 a record was edited, deleted, reordered, inserted or cut short;
2 usage error, unreadable file, or an HMAC-sealed trail without its key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from egress_gateway.audit.chain import ALG_HMAC
from egress_gateway.trail.verify import KeyRequired, verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-gateway audit verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="trail files or directories (rotated, .gz)")
    parser.add_argument(
        "--hmac-key-file", type=Path, help=f"the key of an {ALG_HMAC}-sealed trail (audit.hmac_key_file)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print problems only")
    return parser


def read_key(path: Path) -> bytes:
    """The HMAC key as the gateway reads it: the file's bytes without surrounding whitespace."""
    key = path.read_bytes().strip()
    if not key:
        raise ValueError(f"{path}: the HMAC key file is empty")
    return key


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    for path in args.files:
        if not Path(path).exists():
            print(f"audit verify: {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        key = read_key(args.hmac_key_file) if args.hmac_key_file else None
        result = verify(args.files, key)
    except (OSError, ValueError, KeyRequired) as exc:
        print(f"audit verify: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout
    for problem in result.problems:
        out.write(f"{problem}\n")
    if not args.quiet:
        for note in result.notes:
            out.write(f"note: {note}\n")
        verdict = "intact" if result.ok else f"BROKEN: {len(result.problems)} problem(s)"
        out.write(f"{result.records} sealed record(s) in {result.files} file(s): {verdict}\n")
    return 0 if result.ok else 1
