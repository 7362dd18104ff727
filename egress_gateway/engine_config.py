"""Settings -> `EngineConfig`, in one place, for every command that decides: `run`, `check` and `audit --replay`.

Owns the translation only (default action, allowed ranges, the gateway's own addresses from
`settings.configured_own_addresses`, the SNI rule); the flags of
`check`/`audit` that override a setting are passed in, so all three commands decide with the same configuration.
Imports the settings model and the engine's config type; no adapters.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from egress_gateway.policy.engine import EngineConfig
from egress_gateway.settings import DefaultAction, Settings, configured_own_addresses


def engine_config(
    settings: Settings | None = None,
    *,
    default_action: str | None = None,
    extra_allowed_ranges: Sequence[str] = (),
) -> EngineConfig:
    """The engine's configuration from `settings` (defaults when None), with a command's overrides.

    Raises ValueError for an extra range that is not a CIDR (the settings' own ranges are validated on load).
    """
    if default_action is not None:
        action = DefaultAction(default_action)
    else:
        action = settings.default_action if settings is not None else DefaultAction.DENY
    ranges = [*(settings.allowed_ranges if settings is not None else ()), *extra_allowed_ranges]
    return EngineConfig(
        default_allow=action is DefaultAction.ALLOW,
        allowed_ranges=tuple(ipaddress.ip_network(r, strict=False) for r in ranges),
        own_addresses=configured_own_addresses(settings) if settings is not None else frozenset(),
        require_sni_match=settings.require_sni_match if settings is not None else True,
    )
