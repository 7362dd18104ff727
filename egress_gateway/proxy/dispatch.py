"""Per-connection hook dispatch for the embedded master: the same hooks, called in the same order, for less CPU.

mitmproxy's `AddonManager.handle_lifecycle` walks every addon (and its children) for every hook of every connection,
inside a context manager per addon, and reads each hook's arguments through `dataclasses.fields()` once per handler.
`PrecomputedDispatch` keeps, per hook name, the tuple of handler callables in chain order (rebuilt whenever the chain
changes), reads a hook class's field names once, and calls the handlers directly with mitmproxy's error semantics:
an exception is logged as an addon error and the next handler still runs, `AddonHalt` stops the hook,
`OptionsError` propagates. It replaces the method on one `AddonManager` instance; mitmproxy itself is not modified.
Imports mitmproxy only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, traverse

logger = logging.getLogger("mitmproxy.addonmanager")

_field_names: dict[type, tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """`event.args()` without `dataclasses.fields()` on every call."""
    cls = type(event)
    names = _field_names.get(cls)
    if names is None:
        names = tuple(field.name for field in dataclasses.fields(event))  # type: ignore[arg-type]
        _field_names[cls] = names
    return [getattr(event, name) for name in names]


class PrecomputedDispatch:
    def __init__(self, manager: AddonManager) -> None:
        self.manager = manager
        self._chain: tuple[Any, ...] = ()
        self._handlers: dict[str, tuple[Callable[..., Any], ...]] = {}

    def install(self) -> None:
        self.manager.handle_lifecycle = self.handle_lifecycle  # type: ignore[method-assign]

    def handlers(self, name: str) -> tuple[Callable[..., Any], ...]:
        chain = tuple(self.manager.chain)
        if chain != self._chain:  # an addon was added or removed: forget everything
            self._chain = chain
            self._handlers = {}
        found = self._handlers.get(name)
        if found is None:
            callables = []
            for addon in traverse(chain):
                func = getattr(addon, name, None)
                # Like mitmproxy: a module imported under a hook's name is not a handler.
                if func is not None and callable(func) and not isinstance(func, types.ModuleType):
                    callables.append(func)
            found = tuple(callables)
            self._handlers[name] = found
        return found

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        args = hook_args(event)
        await self._trigger(event.name, args)
        if args and isinstance(args[0], flow.Flow) and self.handlers("update"):
            await self._trigger("update", [[args[0]]])

    async def _trigger(self, name: str, args: list[Any]) -> None:
        for func in self.handlers(name):
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:
                logger.error(f"Addon error: {exc}", exc_info=True)
