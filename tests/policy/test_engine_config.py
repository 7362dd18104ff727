"""`run`, `check` and `audit --replay` decide with one configuration built from the settings (`engine_config`).

The gateway's own listening address is the telling setting: `check` and `audit --replay` used to drop it, so they
allowed what the running gateway blocks. Each command is driven the way users drive it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from egress_gateway.app import build_engine
from egress_gateway.cli import main
from egress_gateway.engine_config import engine_config
from egress_gateway.policy.decision import Facts, Reason
from egress_gateway.policy.store import PolicyStore
from egress_gateway.settings import load_settings
from egress_gateway.sources.files import load_into_store
from tests.audit.conftest import PAYMENTS, SHOP_PAYMENTS_POLICY, record_flows, write_policies
from tests.policy.test_cli import cli

# The address the recorded payments flows resolved api.stripe.com to, and here also the gateway's listening address.
OWN = "93.184.216.34"
CONFIG = f'listen: "{OWN}:3128"\ndefault_action: Allow\nallowed_ranges: ["10.0.0.0/8"]\nrequire_sni_match: true\n'


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """`audit` configures logging in-process; leave the global configuration as found."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    policies = write_policies(tmp_path / "policies", SHOP_PAYMENTS_POLICY)
    return config, policies


def test_the_three_commands_build_the_same_config(setup: tuple[Path, Path]) -> None:
    config, _ = setup
    settings = load_settings(config)
    built = engine_config(settings)
    assert built.own_addresses == frozenset({ipaddress.ip_address(OWN)})
    assert built.default_allow and built.require_sni_match
    assert built.allowed_ranges == (ipaddress.ip_network("10.0.0.0/8"),)
    assert build_engine(settings).config == built  # run
    # check and audit pass no override here: the same object; an override changes only what it names
    assert engine_config(settings, default_action="Deny") == engine_config(settings).__class__(
        default_allow=False,
        allowed_ranges=built.allowed_ranges,
        own_addresses=built.own_addresses,
        require_sni_match=True,
    )


def test_run_blocks_its_own_address(setup: tuple[Path, Path]) -> None:
    config, policies = setup
    engine = build_engine(load_settings(config))
    store = PolicyStore()
    assert load_into_store([policies], store) == []
    engine.policies = store.current
    decision = engine.decide(
        Facts(PAYMENTS, "api.stripe.com", 443, sni="api.stripe.com", destination_ip=ipaddress.ip_address(OWN))
    )
    assert not decision.allowed and decision.reason is Reason.BLOCKED_ADDRESS


def test_check_blocks_the_gateways_own_address(setup: tuple[Path, Path]) -> None:
    config, policies = setup
    args = ["check", "--config", str(config), "--policies", str(policies), "--namespace", "shop"]
    args += ["--label", "app=payments", "--output", "json", "--ip", OWN, "api.stripe.com:443"]
    result = cli(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    payload = json.loads(result.stdout)
    assert payload["reason"] == "blocked_address" and "own address" in payload["message"]


def test_audit_replay_flips_flows_to_the_gateways_own_address(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, policies = setup
    trail = tmp_path / "audit.jsonl"
    record_flows(trail, policies)
    capsys.readouterr()  # the recorder's decision lines
    code = main(["audit", str(trail), "--replay", str(policies), "--config", str(config), "--output", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    flips = {(f["change"], f["destination"]): f["count"] for f in report["flips"]}
    assert flips == {("allow -> deny", "api.stripe.com:443"): 2}
    assert report["flips"][0]["after"].startswith("deny blocked_address")
