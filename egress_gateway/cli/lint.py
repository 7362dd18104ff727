"""`egress-gateway lint PATH...`: validate policy files; every error with file, document, field path and a hint,
all in one pass; then warnings about valid policies that probably do not do what was meant (expired rules,
public-suffix wildcards, `*` where deeper names are meant, shadowed rules, policies that allowlist nothing).

Exit codes: 0 all valid (warnings alone do not fail unless --strict), 1 invalid policies or warnings under
--strict, 2 usage error (e.g. a path that does not exist).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from egress_gateway.policy.lint import LintWarning, describe, lint_policies
from egress_gateway.policy.model import PolicyObject
from egress_gateway.sources.files import LoadError, load_paths


@dataclass(frozen=True, slots=True)
class Located:
    """A valid object and where it came from."""

    file: str
    document: int
    policy: PolicyObject
    version: str
    api_version: str


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "lint", help="validate policy YAML files", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="policy files or directories")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="HOST",
        help="a destination name the policies are meant to cover (repeatable); `*` wildcards that miss it are flagged",
    )
    parser.set_defaults(func=run)


@lru_cache(maxsize=1)
def _public_suffixes() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()  # the list bundled with the package; nothing is fetched


def is_public_suffix(name: str) -> bool:
    return bool(_public_suffixes().is_public(name))


def _error_dict(e: LoadError) -> dict[str, Any]:
    return {
        "file": e.file,
        "document": e.document,
        "kind": e.kind,
        "field": e.error.field,
        "message": e.error.message,
        "hint": e.error.hint,
    }


def run(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        for path in missing:
            print(f"lint: {path}: no such file or directory", file=sys.stderr)
        return 2
    results = load_paths(args.paths)
    errors = [err for result in results.values() for err in result.errors]
    located: list[Located] = [
        Located(str(path), document, item.policy, item.version, api_version)
        for path, result in results.items()
        for item, document, api_version in zip(result.objects, result.documents, result.api_versions, strict=True)
    ]
    warnings = lint_policies([item.policy for item in located], is_public_suffix=is_public_suffix, names=args.name)
    failed = bool(errors) or (args.strict and bool(warnings))
    if args.output == "json":
        print(json.dumps(_json_report(results, errors, located, warnings, failed), indent=2))
    else:
        _print_text(errors, located, warnings)
        status = "ok" if not errors else f"{len(errors)} error(s)"
        if warnings:
            status += f", {len(warnings)} warning(s)" + (" (--strict: failing)" if args.strict else "")
        print(f"{len(results)} file(s), {len(located)} valid object(s): {status}", file=sys.stderr)
    return 1 if failed else 0


def _where(file: str, document: int | None) -> str:
    return f"{file}: document {document}" if document is not None else f"{file}: file"


def _print_text(errors: list[LoadError], located: list[Located], warnings: list[LintWarning]) -> None:
    for err in errors:
        field = f" {err.error.field}:" if err.error.field else ""
        print(f"{_where(err.file, err.document)}:{field} {err.error.message}")
        if err.error.hint:
            print(f"    hint: {err.error.hint}")
    for warning in warnings:
        item = located[warning.policy_index]
        print(f"{_where(item.file, item.document)}: {warning.field}: warning ({warning.code}): {warning.message}")
        if warning.hint:
            print(f"    hint: {warning.hint}")


def _json_report(
    results: dict[Path, Any],
    errors: list[LoadError],
    located: list[Located],
    warnings: list[LintWarning],
    failed: bool,
) -> dict[str, Any]:
    return {
        "valid": not errors,
        "failed": failed,
        "files": len(results),
        "objects": len(located),
        "policies": [
            {
                "file": item.file,
                "document": item.document,
                "apiVersion": item.api_version,  # as written (the model may hold it in the storage version)
                "kind": item.policy.kind,
                "namespace": item.policy.metadata.namespace,
                "name": item.policy.metadata.name,
                "version": item.version,
            }
            for item in located
        ],
        "errors": [_error_dict(e) for e in errors],
        "warnings": [
            {
                "file": located[w.policy_index].file,
                "document": located[w.policy_index].document,
                "policy": describe(located[w.policy_index].policy),
                "code": str(w.code),
                "field": w.field,
                "message": w.message,
                "hint": w.hint,
            }
            for w in warnings
        ],
    }
