"""`egress-gateway lint PATH...`: validate policy files; every error with file, document, field path and a hint.

Exit codes: 0 all valid, 1 invalid policies, 2 usage error (e.g. a path that does not exist).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from egress_gateway.sources.files import load_paths


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("lint", help="validate policy YAML files", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="policy files or directories")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        for path in missing:
            print(f"lint: {path}: no such file or directory", file=sys.stderr)
        return 2
    results = load_paths(args.paths)
    errors = [err for result in results.values() for err in result.errors]
    objects = sum(len(r.objects) for r in results.values())
    if args.output == "json":
        payload = {
            "valid": not errors,
            "files": len(results),
            "objects": objects,
            "errors": [
                {
                    "file": e.file,
                    "document": e.document,
                    "field": e.error.field,
                    "message": e.error.message,
                    "hint": e.error.hint,
                }
                for e in errors
            ],
        }
        print(json.dumps(payload, indent=2))
    else:
        for err in errors:
            doc = f"document {err.document}" if err.document is not None else "file"
            field = f" {err.error.field}:" if err.error.field else ""
            print(f"{err.file}: {doc}:{field} {err.error.message}")
            if err.error.hint:
                print(f"    hint: {err.error.hint}")
        status = "ok" if not errors else f"{len(errors)} error(s)"
        print(f"{len(results)} file(s), {objects} valid object(s): {status}", file=sys.stderr)
    return 1 if errors else 0
