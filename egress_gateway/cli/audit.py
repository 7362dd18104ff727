"""`egress-gateway audit [FILE...]`: query the JSON-lines audit trail (files, rotated, gzip, or stdin).

Lists connections matching the filters, or with --summary counts them by namespace, destination and decision;
--suggest-policy NAMESPACE prints the EgressPolicy that would allow exactly what the namespace was seen using;
--replay POLICIES_DIR re-decides every recorded connection under candidate policies and reports what would flip,
in both directions (allow -> deny closes access, deny -> allow opens it), and the candidate rules no recorded
connection exercises ("untested by the trail"). --expect FILE lists intended changes, so a CI gate fails only on
unintended ones; --fail-on opened|closed|any says which direction fails (default any).

Exit codes: 0 done; 1 --replay found unexpected changes in a --fail-on direction (a CI gate), or
--suggest-policy found nothing to suggest; 2 usage error, unreadable trail, invalid policies, config or gate file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_gateway.audit import fields
from egress_gateway.trail.read import FlowFilter, FlowRecord, ReadStats, parse_time, read_records, summarize
from egress_gateway.trail.render import write_csv, write_json_lines, write_table

FLOW_COLUMNS = (
    ("time", "TIME"),
    ("namespace", "NAMESPACE"),
    ("pod", "POD"),
    ("method", "METHOD"),
    ("destination", "DESTINATION"),
    ("sni", "SNI"),
    ("peer", "PEER IP"),
    ("decision", "DECISION"),
    ("reason", "REASON"),
    ("policy", "POLICY"),
    ("rule", "RULE"),
    ("would_deny", "WOULD DENY"),
)
CSV_COLUMNS = (
    "time",
    "trace_id",
    "span_id",
    "namespace",
    "pod",
    "client",
    "method",
    "host",
    "port",
    "sni",
    "peer",
    "decision",
    "reason",
    "policy",
    "policy_version",
    "rule",
    "would_deny",
    "would_deny_policy",
    "would_deny_rule",
    "status_code",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
)
SUMMARY_COLUMNS = (
    ("count", "COUNT"),
    ("namespace", "NAMESPACE"),
    ("destination", "DESTINATION"),
    ("decision", "DECISION"),
    ("would_deny", "WOULD DENY"),
    ("reasons", "REASONS"),
    ("last_seen", "LAST SEEN"),
)

if TYPE_CHECKING:
    from egress_gateway.policy.engine import Engine


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    return key, value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="query the audit trail: filter, summarize, suggest a policy, replay candidate policies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files", nargs="*", metavar="FILE", help="trail files or directories (rotated and .gz are fine); '-' = stdin"
    )
    filters = parser.add_argument_group("filters (all must match)")
    filters.add_argument("--namespace", help="client namespace")
    filters.add_argument("--pod", help="client pod name (glob)")
    filters.add_argument("--decision", choices=("allow", "deny"))
    filters.add_argument("--reason", help="reason code, e.g. no_matching_rule, sni_mismatch")
    filters.add_argument("--host", help="requested host (glob, case-insensitive), e.g. '*.amazonaws.com'")
    filters.add_argument("--would-deny", action="store_true", help="only flows an Audit-mode policy would deny")
    filters.add_argument("--since", help="start bound: a duration ago (30m, 1h, 2d) or ISO 8601")
    filters.add_argument("--until", help="end bound: a duration ago or ISO 8601")
    filters.add_argument("--policy", help="deciding policy: Kind/namespace/name, namespace/name or name")
    filters.add_argument("--rule", help="deciding (or would-deny) rule name")
    filters.add_argument(
        "--open", action="store_true", help="only connections opened and never closed (still open, or the gateway died)"
    )
    parser.add_argument("--output", choices=("table", "json", "csv"), default="table")

    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--summary", action="store_true", help="counts by namespace, destination and decision")
    modes.add_argument("--follow", "-f", action="store_true", help="tail one live trail FILE: a line per connection")
    modes.add_argument("--suggest-policy", metavar="NAMESPACE", help="print an EgressPolicy for what NAMESPACE used")
    modes.add_argument("--replay", type=Path, metavar="POLICIES_DIR", help="re-decide under candidate policies")
    parser.add_argument("--top", type=_positive, default=20, help="--summary: rows to show (default 20)")
    parser.add_argument(
        "--pod-label", type=_label, action="append", default=[], metavar="K=V", help="--suggest-policy: pod selector"
    )
    parser.add_argument(
        "--collapse",
        action="store_true",
        help="--suggest-policy: siblings become '*.parent' (prints a warning naming what each wildcard newly admits)",
    )
    parser.add_argument(
        "--policies",
        type=Path,
        metavar="DIR",
        help="--suggest-policy: the policies in force; what their Deny rules (any tier) or address safety refuse is "
        "never suggested, and their rule names are kept where a suggestion extends a rule",
    )
    parser.add_argument("--name", help="--suggest-policy: metadata.name (default NAMESPACE-observed)")
    parser.add_argument("--mode", choices=("Enforce", "Audit"), default="Enforce", help="--suggest-policy: spec.mode")
    parser.add_argument(
        "--config", type=Path, help="--replay, --suggest-policy: gateway config (default_action, allowed_ranges, ...)"
    )
    parser.add_argument("--default-action", choices=("Allow", "Deny"), help="--replay: override the config")
    parser.add_argument(
        "--expect",
        type=Path,
        metavar="FILE",
        help="--replay: YAML list of intended changes (change: opened|closed, "
        "namespace, pod, destination globs, why); they do not fail the gate",
    )
    parser.add_argument(
        "--fail-on",
        choices=("opened", "closed", "any"),
        default="any",
        help="--replay: which unexpected changes exit 1: opened (deny -> allow), closed (allow -> deny), any (default)",
    )
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"audit: {message}", file=sys.stderr)
    return 2


def _flow_row(record: FlowRecord) -> dict[str, Any]:
    attrs = record.attributes
    client = attrs.get(fields.CLIENT_ADDRESS)
    return {
        "time": record.start.strftime("%Y-%m-%d %H:%M:%S"),
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "namespace": record.namespace,
        "pod": record.pod,
        "client": f"{client}:{attrs.get(fields.CLIENT_PORT)}" if client else None,
        "method": record.method,
        "destination": record.destination,
        "host": record.host,
        "port": record.port,
        "sni": record.sni,
        "peer": record.peer_address,
        "decision": record.decision if record.closed else f"{record.decision} (open)",
        "reason": record.reason,
        "policy": record.policy,
        "policy_version": record.policy_version,
        "rule": record.rule,
        "would_deny": record.would_deny,
        "would_deny_policy": attrs.get(fields.WOULD_DENY_POLICY),
        "would_deny_rule": attrs.get(fields.WOULD_DENY_RULE),
        "status_code": attrs.get(fields.HTTP_STATUS),
        "bytes_sent": attrs.get(fields.BYTES_SENT),
        "bytes_received": attrs.get(fields.BYTES_RECEIVED),
        "duration_ms": round((record.end - record.start).total_seconds() * 1000, 3),
    }


def _build_filter(args: argparse.Namespace) -> FlowFilter:
    return FlowFilter(
        namespace=args.namespace,
        pod=args.pod,
        decision=args.decision,
        reason=args.reason,
        host=args.host,
        would_deny=args.would_deny,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        policy=args.policy,
        rule=args.rule,
        never_closed=args.open,
    )


def _selected(args: argparse.Namespace, flow_filter: FlowFilter, stats: ReadStats) -> Iterator[FlowRecord]:
    return (r for r in read_records(args.files, stats) if flow_filter.matches(r))


def _list(records: Iterator[FlowRecord], output: str) -> int:
    if output == "json":  # every attribute, for jq
        return write_json_lines((r.flat() for r in records), sys.stdout)
    if output == "csv":
        return write_csv((_flow_row(r) for r in records), CSV_COLUMNS, sys.stdout)
    return write_table((_flow_row(r) for r in records), FLOW_COLUMNS, sys.stdout)


def _summary(records: Iterator[FlowRecord], output: str, top: int) -> int:
    rows = [row.as_dict() for row in summarize(records, top)]
    for row in rows:
        row["last_seen"] = row["last_seen"][:19].replace("T", " ")
    if output == "json":
        return write_json_lines(rows, sys.stdout)
    if output == "csv":
        return write_csv(rows, None, sys.stdout)
    return write_table(rows, SUMMARY_COLUMNS, sys.stdout)


def _engine(policies: Path, args: argparse.Namespace, flag: str) -> Engine | None:
    """The real engine over the policy files at `policies` and the gateway config; None (reported) when invalid."""
    from egress_gateway.engine_config import engine_config
    from egress_gateway.policy.engine import Engine
    from egress_gateway.policy.store import PolicyStore
    from egress_gateway.settings import load_settings
    from egress_gateway.sources.files import load_into_store

    if not policies.exists():
        _fail(f"{flag} {policies}: no such file or directory")
        return None
    try:
        settings = load_settings(args.config) if args.config else None
    except Exception as exc:
        _fail(f"invalid config: {exc}")
        return None
    store = PolicyStore()
    errors = load_into_store([policies], store)
    if errors:
        for err in errors:
            print(f"audit: invalid policy: {err}", file=sys.stderr)
        return None
    config = engine_config(settings, default_action=args.default_action)
    return Engine(config, store.current)


def _suggest(records: Iterator[FlowRecord], args: argparse.Namespace) -> int:
    from egress_gateway.cli.lint import is_public_suffix
    from egress_gateway.trail.suggest import suggest_policy

    engine = None
    if args.policies is not None:
        engine = _engine(args.policies, args, "--policies")
        if engine is None:
            return 2
    suggestion = suggest_policy(
        records,
        args.suggest_policy,
        pod_labels=dict(args.pod_label),
        collapse=args.collapse,
        name=args.name,
        mode=args.mode,
        engine=engine,
        is_public_suffix=is_public_suffix,
    )
    for warning in suggestion.warnings:
        print(f"audit: warning: {warning}", file=sys.stderr)
    if suggestion.flows == 0:
        selector = "".join(f", pod label {k}={v}" for k, v in args.pod_label)
        print(
            f"audit: no allowed connections of namespace {args.suggest_policy!r}{selector} in the trail; "
            "nothing to suggest",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(suggestion.to_yaml())
    return 0


REPLAY_COLUMNS = (
    ("count", "COUNT"),
    ("namespace", "NAMESPACE"),
    ("pod", "POD"),
    ("destination", "DESTINATION"),
    ("before", "BEFORE"),
    ("after", "AFTER"),
    ("expected", "EXPECTED"),
)
REPLAY_SECTIONS = (
    ("allow -> deny", "allow -> deny: access the candidate closes"),
    ("deny -> allow", "deny -> allow: access the candidate opens"),
    ("allow -> would deny (Audit mode)", "allow -> would deny: an Audit-mode candidate policy would deny"),
)


def _load_expectations(path: Path) -> list[Any]:
    import yaml

    from egress_gateway.trail.replay import parse_expectations

    return parse_expectations(yaml.safe_load(path.read_text(encoding="utf-8")))


def _replay(records: Iterator[FlowRecord], args: argparse.Namespace) -> int:
    import json

    import yaml

    from egress_gateway.trail.replay import (
        ALLOW_TO_DENY,
        CLOSED,
        DENY_TO_ALLOW,
        NEWLY_WOULD_DENY,
        OPENED,
        InvalidExpectation,
        replay,
    )

    expectations = []
    if args.expect is not None:
        try:
            expectations = _load_expectations(args.expect)
        except (OSError, yaml.YAMLError, InvalidExpectation) as exc:
            return _fail(f"--expect {args.expect}: {exc}")
    engine = _engine(args.replay, args, "--replay")
    if engine is None:
        return 2
    report = replay(records, engine, expectations=expectations)
    payload = report.as_dict(args.fail_on)
    if args.output == "json":
        print(json.dumps(payload, indent=2))
    elif args.output == "csv":
        write_csv(
            payload["flips"],
            ("change", "count", "namespace", "pod", "destination", "before", "after", "expected"),
            sys.stdout,
        )
    else:
        out = sys.stdout
        policies = len(engine.policies)
        out.write(
            f"replayed {report.replayed} connection(s) under {policies} candidate policy object(s) from {args.replay}\n"
        )
        closed, opened = report.count(ALLOW_TO_DENY), report.count(DENY_TO_ALLOW)
        out.write(
            f"  allow -> deny: {closed} ({closed - report.unexpected(CLOSED)} expected)   "
            f"deny -> allow: {opened} ({opened - report.unexpected(OPENED)} expected)   "
            f"allow -> would deny: {report.count(NEWLY_WOULD_DENY)}   unchanged: {report.unchanged}\n"
        )
        if report.not_replayable:
            skipped = ", ".join(f"{reason}={n}" for reason, n in report.not_replayable.most_common())
            out.write(f"  not replayable (decided outside the policy engine): {skipped}\n")
        for change, title in REPLAY_SECTIONS:
            rows = [
                {**vars_of(key), "count": count, "expected": report.expected(key)}
                for key, count in report.groups(change)
            ]
            if rows:
                out.write(f"\n{title}\n")
                write_table(rows, REPLAY_COLUMNS, out, max_cell=None)
        if report.unmet():
            out.write("\nexpected changes that did not happen (check the candidate or the --expect file):\n")
            out.writelines(f"  - {e.describe()}\n" for e in report.unmet())
        if report.untested:
            out.write("\nuntested by the trail (no recorded connection of a selected client matches these rules):\n")
            out.writelines(f"  - {u.describe()}\n" for u in report.untested)
        unexpected = {CLOSED: report.unexpected(CLOSED), OPENED: report.unexpected(OPENED)}
        counted = ", ".join(f"{k} {v}" for k, v in unexpected.items())
        verdict = "FAIL" if report.fails(args.fail_on) else "pass"
        out.write(f"\nresult: {verdict} (--fail-on {args.fail_on}; unexpected changes: {counted})\n")
    return 1 if report.fails(args.fail_on) else 0


def vars_of(key: Any) -> dict[str, Any]:
    return {name: getattr(key, name) for name in key.__slots__}


def run(args: argparse.Namespace) -> int:
    from egress_gateway.logging import configure_logging

    configure_logging("warning", "console")  # stdout carries only the report (tables, JSON, CSV, YAML)
    try:
        flow_filter = _build_filter(args)
    except ValueError as exc:
        return _fail(str(exc))
    if args.suggest_policy and args.namespace and args.namespace != args.suggest_policy:
        return _fail("--namespace and --suggest-policy name different namespaces")
    for path in args.files:
        if path != "-" and not Path(path).exists():
            return _fail(f"{path}: no such file or directory")
    if args.follow:
        from egress_gateway.trail.follow import run_follow

        return run_follow(args.files, flow_filter, args.output)
    stats = ReadStats()
    records = _selected(args, flow_filter, stats)
    try:
        if args.summary:
            code = 0
            _summary(records, args.output, args.top)
        elif args.suggest_policy:
            code = _suggest(records, args)
        elif args.replay is not None:
            code = _replay(records, args)
        else:
            code = 0
            _list(records, args.output)
    except BrokenPipeError:  # `audit ... | head`
        return 0
    except OSError as exc:
        return _fail(f"cannot read the trail: {exc}")
    if stats.skipped:
        print(f"audit: skipped {stats.skipped} line(s) that are not trail spans:", file=sys.stderr)
        for line in stats.bad_lines:
            print(f"  {line}", file=sys.stderr)
    return code
