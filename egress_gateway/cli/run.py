"""`egress-gateway run`: start the gateway (proxy + admin listener) and serve until SIGTERM.

Flags override the YAML file given with `--config` and the `EGRESS_GATEWAY_*` environment. Exit codes: 0 after a
clean drain, 1 when the listeners cannot start, 2 for configuration errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("run", help="run the egress gateway", description=__doc__)
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML settings file (docs/configuration.md)")
    parser.add_argument("--policies", type=Path, metavar="DIR", help="policy directory (policies_path)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="proxy listen address (default 127.0.0.1:3128)")
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="admin listen address (default 127.0.0.1:9901)")
    parser.add_argument(
        "--kubernetes", action="store_true", help="read policies from the Kubernetes API (policy_source: kubernetes)"
    )
    parser.add_argument("--kubeconfig", type=Path, metavar="FILE", help="kubeconfig file (default: in-cluster)")
    parser.set_defaults(func=run)


def _one_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `egress-gateway --help` and the other subcommands stay fast.
    from egress_gateway.logging import setup_logging
    from egress_gateway.settings import load_settings

    try:
        settings = load_settings(
            args.config,
            policies_path=args.policies,
            listen=args.listen,
            admin_listen=args.admin_listen,
            policy_source="kubernetes" if args.kubernetes else None,
            kubernetes={"kubeconfig": args.kubeconfig} if args.kubeconfig else None,
        )
    except FileNotFoundError as exc:
        print(f"egress-gateway run: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"egress-gateway run: invalid configuration: {_one_line(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:  # e.g. an EGRESS_GATEWAY_* variable that is not valid JSON for a list/dict key
        print(f"egress-gateway run: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log.level, settings.log.format)

    from egress_gateway.app import run as run_gateway

    return run_gateway(settings)
