"""Precomputed hook dispatch: the same handlers in the same order with mitmproxy's error semantics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from mitmproxy import exceptions, options
from mitmproxy.master import Master
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow

from egress_gateway.proxy.dispatch import PrecomputedDispatch, hook_args


class Recording:
    def __init__(self, name: str, calls: list[tuple[str, str]], fail: BaseException | None = None) -> None:
        self.name = name
        self.calls = calls
        self.fail = fail

    def client_connected(self, client: Any) -> None:
        self.calls.append((self.name, "client_connected"))
        if self.fail is not None:
            raise self.fail

    async def http_connect(self, flow: Any) -> None:
        await asyncio.sleep(0)
        self.calls.append((self.name, "http_connect"))

    def update(self, flows: Any) -> None:
        self.calls.append((self.name, f"update:{len(flows)}"))


def _run(scenario: Any) -> Any:
    async def main() -> Any:
        master = Master(options.Options(), event_loop=asyncio.get_running_loop())
        return await scenario(master)

    return asyncio.run(main())


def test_handlers_run_in_chain_order_sync_and_async_with_the_update_hook() -> None:
    calls: list[tuple[str, str]] = []

    async def scenario(master: Master) -> None:
        master.addons.add(Recording("a", calls), Recording("b", calls))
        PrecomputedDispatch(master.addons).install()
        flow = tflow.tflow()
        await master.addons.handle_lifecycle(server_hooks.ClientConnectedHook(flow.client_conn))
        from mitmproxy.proxy.layers.http import HttpConnectHook

        await master.addons.handle_lifecycle(HttpConnectHook(flow))

    _run(scenario)
    assert calls == [
        ("a", "client_connected"),
        ("b", "client_connected"),
        ("a", "http_connect"),
        ("b", "http_connect"),
        ("a", "update:1"),
        ("b", "update:1"),
    ]


def test_an_addon_error_is_logged_and_the_next_handler_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[tuple[str, str]] = []

    async def scenario(master: Master) -> None:
        master.addons.add(Recording("a", calls, fail=RuntimeError("boom")), Recording("b", calls))
        PrecomputedDispatch(master.addons).install()
        await master.addons.handle_lifecycle(server_hooks.ClientConnectedHook(tflow.tclient_conn()))

    with caplog.at_level(logging.ERROR):
        _run(scenario)
    assert calls == [("a", "client_connected"), ("b", "client_connected")]
    assert "Addon error: boom" in caplog.text


def test_addon_halt_stops_the_hook() -> None:
    calls: list[tuple[str, str]] = []

    async def scenario(master: Master) -> None:
        master.addons.add(Recording("a", calls, fail=exceptions.AddonHalt()), Recording("b", calls))
        PrecomputedDispatch(master.addons).install()
        await master.addons.handle_lifecycle(server_hooks.ClientConnectedHook(tflow.tclient_conn()))

    _run(scenario)
    assert calls == [("a", "client_connected")]


def test_an_addon_added_later_is_dispatched_to() -> None:
    calls: list[tuple[str, str]] = []

    async def scenario(master: Master) -> None:
        master.addons.add(Recording("a", calls))
        PrecomputedDispatch(master.addons).install()
        hook = server_hooks.ClientConnectedHook(tflow.tclient_conn())
        await master.addons.handle_lifecycle(hook)
        master.addons.add(Recording("late", calls))
        await master.addons.handle_lifecycle(hook)

    _run(scenario)
    assert calls == [("a", "client_connected"), ("a", "client_connected"), ("late", "client_connected")]


def test_hook_args_match_mitmproxy() -> None:
    flow = tflow.tflow()
    hook = server_hooks.ClientConnectedHook(flow.client_conn)
    assert hook_args(hook) == hook.args()
    assert hook_args(hook) == hook.args()  # cached field names
