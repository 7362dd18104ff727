"""`egress-gateway crd`: print both CustomResourceDefinitions as multi-document YAML (or write one file each)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from egress_gateway.policy.crd import custom_resource_definitions


def render(crd: dict[str, Any]) -> str:
    return yaml.safe_dump(crd, sort_keys=False, default_flow_style=False, width=120)


def render_all() -> str:
    return "".join(f"---\n{render(crd)}" for crd in custom_resource_definitions())


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("crd", help="print the CustomResourceDefinitions", description=__doc__)
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="write <plural>.<group>.yaml files into this directory instead of stdout",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output_dir is None:
        print(render_all(), end="")
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for crd in custom_resource_definitions():
        (args.output_dir / f"{crd['metadata']['name']}.yaml").write_text(render(crd))
    return 0
