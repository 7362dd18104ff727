"""Command-line entry point: `egress-gateway SUBCOMMAND`. Each subcommand lives in its own module here and exposes
`add_parser(subparsers)`, which registers it and sets `func(args) -> int` (the exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from egress_gateway import __version__

# Subcommand modules, in help order. A module that fails to import is reported, not fatal for the others.
SUBCOMMANDS = ("run", "check", "lint", "crd", "audit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-gateway",
        description="Kubernetes egress gateway: per-namespace EgressPolicy enforcement without TLS interception.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"egress_gateway.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"egress_gateway.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["audit", "verify"]:  # its own parser: `audit` takes trail files as positionals
        from egress_gateway.cli import audit_verify

        return audit_verify.main(argv[2:])
    if argv[:2] == ["audit", "show-policy"]:
        from egress_gateway.cli import audit_show_policy

        return audit_show_policy.main(argv[2:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; keep that contract
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))
