"""`egress-gateway check`: what would the gateway decide for one connection, from the policy files alone.

No DNS lookups unless `--resolve` is given (`--ip` stands in for resolution). Exit codes: 0 allow, 1 deny,
2 usage error or invalid policies.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from egress_gateway.engine_config import engine_config
from egress_gateway.policy.decision import Decision, Facts, Identity, IPAddress, Reason
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.errors import InvalidTarget
from egress_gateway.policy.explain import explain, render
from egress_gateway.policy.model import NAMESPACE_NAME_LABEL
from egress_gateway.policy.near_miss import NearMiss, near_misses
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.targets import normalize_host, parse_authority
from egress_gateway.settings import DefaultAction, load_settings
from egress_gateway.sources.files import load_into_store

_SCHEME_PORTS = {"http": 80, "https": 443}


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    return key, value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("check", help="decide one connection against policy files", description=__doc__)
    parser.add_argument("target", metavar="TARGET", help="host:port, [v6]:port, or a URL (http://, https://)")
    parser.add_argument("--policies", type=Path, action="append", help="policy directory or file (repeatable)")
    parser.add_argument("--config", type=Path, help="gateway config file (default_action, allowed_ranges, ...)")
    parser.add_argument("--namespace", help="client namespace (omit to test an unknown client)")
    parser.add_argument("--pod", help="client pod name")
    parser.add_argument("--label", type=_label, action="append", default=[], metavar="K=V", help="pod label")
    parser.add_argument(
        "--namespace-label", type=_label, action="append", default=[], metavar="K=V", help="namespace label"
    )
    parser.add_argument("--sni", help="TLS SNI the client sends")
    parser.add_argument("--host-header", help="Host header of a plain-HTTP request")
    parser.add_argument("--ip", action="append", default=[], help="destination IP (stands in for DNS; repeatable)")
    parser.add_argument("--resolve", action="store_true", help="resolve the name with the system resolver")
    parser.add_argument("--default-action", choices=[a.value for a in DefaultAction], help="override the config")
    parser.add_argument("--allowed-range", action="append", default=[], metavar="CIDR", help="exempt from blocking")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument(
        "--explain", action="store_true", help="print the tier walk: each tier, each policy considered, what it said"
    )
    parser.set_defaults(func=run)


def _parse_target(text: str) -> tuple[str, int, str | None]:
    """-> (host, port, host header for plain HTTP URLs)."""
    if "://" in text:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme not in _SCHEME_PORTS or not parts.netloc:
            raise InvalidTarget(f"unsupported URL {text!r} (use http:// or https://)")
        host, port = parse_authority(parts.netloc, default_port=_SCHEME_PORTS[scheme])
        return host, port, parts.netloc if scheme == "http" else None
    host, port = parse_authority(text)
    return host, port, None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _print_text(decision: Decision, ip: str | None, misses: list[NearMiss]) -> None:
    print(f"decision: {decision.verdict}")
    print(f"reason:   {decision.reason}")
    if ip:
        print(f"ip:       {ip}")
    if decision.policy and decision.rule:  # no_matching_rule names every selecting policy below, not one
        print(f"policy:   {decision.policy} (version {decision.policy.version})")
    if decision.rule:
        print(f"rule:     {decision.rule}")
    if decision.matched:
        print(f"matched:  {decision.matched}")
    if decision.logged:
        print("logged:   yes (a Log rule matched; flagged for review)")
    if decision.tier:
        print(f"tier:     {decision.tier}")
    for decider in decision.deciders:
        print(f"decider:  {decider}")
    if decision.would_deny:
        print(f"would_deny: {decision.audit_reason} by {decision.audit_policy} rule {decision.audit_rule}")
        for decider in decision.audit_deciders:
            print(f"would_deny decider: {decider}")
    print(decision.message)
    if misses:
        print("near misses:")
        for miss in misses:
            print(f"  - {miss.sentence}")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config) if args.config else None
    except Exception as exc:
        print(f"check: invalid config: {exc}", file=sys.stderr)
        return 2
    policy_paths = args.policies or [settings.policies_path if settings else Path("policies")]
    store = PolicyStore()
    errors = load_into_store(policy_paths, store)
    if errors:
        for err in errors:
            print(f"check: invalid policy: {err}", file=sys.stderr)
        return 2
    try:
        host, port, host_header = _parse_target(args.target)
        normalize_host(host)
    except InvalidTarget as exc:
        print(f"check: invalid target: {exc}", file=sys.stderr)
        return 2
    try:
        config = engine_config(settings, default_action=args.default_action, extra_allowed_ranges=args.allowed_range)
        ips = [ipaddress.ip_address(ip) for ip in args.ip]
    except ValueError as exc:
        print(f"check: {exc}", file=sys.stderr)
        return 2
    if args.resolve and not ips:
        try:
            ips = [ipaddress.ip_address(ip) for ip in _resolve(host, port)]
        except OSError as exc:
            print(f"check: cannot resolve {host!r}: {exc}", file=sys.stderr)
            return 1
    identity = None
    if args.namespace:
        ns_labels = {**dict(args.namespace_label), NAMESPACE_NAME_LABEL: args.namespace}
        identity = Identity(
            namespace=args.namespace,
            pod=args.pod,
            labels=MappingProxyType(dict(args.label)),
            namespace_labels=MappingProxyType(ns_labels),
        )
    engine = Engine(config, store.current)
    header = args.host_header or host_header
    candidates: list[IPAddress | None] = list(ips) or [None]
    decisions = [
        (ip, engine.decide(Facts(identity, host, port, sni=args.sni, host_header=header, destination_ip=ip)))
        for ip in candidates
    ]
    ip, decision = next(((i, d) for i, d in decisions if d.allowed), decisions[0])
    # Near misses explain rule outcomes; a deny decided before the rules (address safety, SNI, unknown client) has none.
    by_rules = decision.reason in (
        Reason.NO_MATCHING_RULE,
        Reason.NO_POLICY,
        Reason.DENIED_BY_RULE,
        Reason.ALLOWED_BY_RULE,
    )
    decided = Facts(identity, host, port, sni=args.sni, host_header=header, destination_ip=ip)
    misses = near_misses(store.current, decided, time.time()) if by_rules else []
    walk = None
    if args.explain:
        facts = Facts(identity, host, port, sni=args.sni, host_header=header, destination_ip=ip)
        walk = explain(engine, facts)
    if args.output == "json":
        payload: dict[str, object] = {
            key: value if value is None or isinstance(value, bool) else str(value)
            for key, value in asdict(decision).items()
        }
        payload["decision"] = decision.verdict
        payload["ip"] = str(ip) if ip else None
        for key in ("policy", "audit_policy"):
            ref = getattr(decision, key)
            payload[key] = asdict(ref) if ref else None
        for key in ("deciders", "audit_deciders"):
            payload[key] = [asdict(d) for d in getattr(decision, key)]
        payload["near_misses"] = [
            {"policy": asdict(miss.policy), "rule": miss.rule, "sentence": miss.sentence} for miss in misses
        ]
        if args.explain:
            payload["walk"] = [asdict(tier) for tier in walk.tiers] if walk else []
        print(json.dumps(payload, indent=2, default=str))
    else:
        _print_text(decision, str(ip) if ip else None, misses)
        if walk is not None:
            print("tier walk:")
            for line in render(walk):
                print(f"  {line}")
    return 0 if decision.allowed else 1
