"""The proxy's listeners: the proxy port, and in transparent mode the name-routed ones (`transparent.py`). Each
accepts client connections and gives each a `Session` (`session.py`), which owns it from accept to close. Sessions
are found by id in the one registry of live sessions, `GatewayAddon.clients` (revocation, limits, timers,
`close_client`, the shutdown drain). Knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from egress_gateway.proxy.addon import GatewayAddon
from egress_gateway.proxy.session import Session
from egress_gateway.proxy.transparent import Transparent

# Serves a non-CONNECT connection (mitmproxy's HTTP engine): reader, writer, the session.
HandOver = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Session], Awaitable[None]]


class Listener:
    """Accepts on one listening socket; keeps the tasks its sessions spawn until they end."""

    def __init__(
        self, addon: GatewayAddon, hand_over: HandOver, idle_timeout_s: float, transparent: Transparent | None = None
    ) -> None:
        """`transparent`: a name-routed listener (its sessions take the destination from the first message)."""
        self.addon = addon
        self.transparent = transparent
        self.hand_over = hand_over
        self.idle_timeout_s = idle_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Session(self), sock=sock)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # open connections stay
            self._server = None

    async def wait_closed(self, timeout_s: float) -> None:
        """Let the tasks of closed connections (a pending decision, mitmproxy's teardown) finish, up to `timeout_s`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def spawn(self, coroutine: Coroutine[Any, Any, None], connection: Session | None = None) -> None:
        """Run `coroutine` at once up to its first wait (`asyncio.eager_task_factory`): a decision needing no I/O ends
        in the caller. A task still waiting is kept, and is the connection's pending `task` (its decision or dial)."""
        task = asyncio.eager_task_factory(asyncio.get_running_loop(), coroutine)
        if task.done():
            if connection is not None:
                connection.task_done(task)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if connection is not None:
            connection.task = task
            task.add_done_callback(connection.task_done)
