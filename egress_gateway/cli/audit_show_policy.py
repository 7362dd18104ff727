"""`egress-gateway audit show-policy VERSION FILE...`: what was in force, from the trail's `policy` records.

VERSION is a snapshot id (`egress.policy_snapshot` of a connection record; a prefix is enough), or the version or
content hash of one policy (`egress.policy.version`): then every snapshot that held that policy version is shown.
Exit codes: 0 found; 1 no policy record matches; 2 usage error or unreadable trail.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from egress_gateway.trail.read import _open_binary, expand_paths

POLICY_RECORD = "policy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-gateway audit show-policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("version", metavar="VERSION", help="snapshot id, or a policy's version or content hash")
    parser.add_argument("files", nargs="+", metavar="FILE", help="trail files or directories (rotated, .gz)")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    return parser


def policy_records(sources: Sequence[str]) -> Iterator[dict[str, Any]]:
    for path in expand_paths(sources):
        with _open_binary(path) as stream:
            for raw in stream:
                if b'"recordType":"policy"' not in raw:
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("recordType") == POLICY_RECORD:
                    obj.pop("chain", None)
                    yield obj


def matches(record: Mapping[str, Any], version: str) -> bool:
    if str(record.get("snapshot", "")).startswith(version):
        return True
    return any(version in (p.get("version"), p.get("contentHash")) for p in record.get("policies", ()))


def _text(record: Mapping[str, Any]) -> str:
    config = dict(record.get("config", {}))
    lines = [
        f"snapshot {record.get('snapshot')}  generation {record.get('generation')}  "
        f"recorded {record.get('timeUnixNano')} ns",
        f"  config {config.pop('hash', '?')}",
    ]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in config.items()]
    lines.append(f"  policies ({len(record.get('policies', ()))}):")
    for policy in record.get("policies", ()):
        where = f"{policy['namespace']}/" if policy.get("namespace") else ""
        lines.append(
            f"    {policy['kind']}/{where}{policy['name']}  version {policy['version']}  {policy['contentHash']}  "
            f"{policy.get('mode', '')} {policy.get('tier', '')}".rstrip()
        )
        for key, value in (policy.get("annotations") or {}).items():
            lines.append(f"      {key}: {value}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    for path in args.files:
        if not Path(path).exists():
            print(f"audit show-policy: {path}: no such file or directory", file=sys.stderr)
            return 2
    found: dict[str, dict[str, Any]] = {}
    try:
        for record in policy_records(args.files):
            if matches(record, args.version):
                found.setdefault(str(record.get("snapshot")), record)  # a snapshot re-recorded at a restart: once
    except OSError as exc:
        print(f"audit show-policy: cannot read the trail: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"audit show-policy: no policy record matches {args.version!r}", file=sys.stderr)
        return 1
    for record in found.values():
        sys.stdout.write(json.dumps(record) + "\n" if args.output == "json" else _text(record))
    return 0
