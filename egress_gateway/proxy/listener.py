"""The proxy's listeners: the proxy port, and in transparent mode the name-routed ones (`transparent.py`). Each
accepts client connections and gives each a `Session` (`session.py`), which owns it from accept to close. Sessions
are found by id in the one registry of live sessions, `GatewayAddon.clients` (revocation, limits, timers,
`close_client`, the shutdown drain). Knows nothing about policies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from egress_gateway.proxy.addon import GatewayAddon
from egress_gateway.proxy.session import Session
from egress_gateway.proxy.transparent import Transparent

# Serves a non-CONNECT connection (mitmproxy's HTTP engine): reader, writer, the session.
HandOver = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Session], Awaitable[None]]


def dials_itself(address: tuple[str, int], own_address: tuple[str, int]) -> bool:
    """Would dialing `address` reach the proxy listening on `own_address`? Its port on the bound address, on any
    loopback or unspecified address, or on `localhost`. Used by both paths: the listener's tunnels and mitmproxy's."""
    host, port = str(address[0]), int(address[1])
    if port != int(own_address[1]):
        return False
    if host in (str(own_address[0]), "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


class Listener:
    """Accepts on one listening socket; closes or answers a live session by id."""

    def __init__(
        self,
        addon: GatewayAddon,
        hand_over: HandOver,
        idle_timeout_s: float,
        own_address: tuple[str, int],
        transparent: Transparent | None = None,
    ) -> None:
        """`transparent`: a name-routed listener (its sessions take the destination from the first message)."""
        self.addon = addon
        self.transparent = transparent
        self.hand_over = hand_over
        self.idle_timeout_s = idle_timeout_s
        self.own_port = own_address[1]
        self.own_host = str(own_address[0])
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Session(self), sock=sock)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # open connections stay; other workers may still accept on their copy
            self._server = None

    @property
    def sessions(self) -> int:
        return len(self.addon.clients)

    def session_ids(self) -> list[str]:
        return list(self.addon.clients)

    def close_client(self, client_id: str) -> bool:
        state = self.addon.clients.get(client_id)
        if state is None:
            return False
        state.owner.abort()
        return True

    def answer_and_close(self, client_id: str, answer: bytes) -> None:
        state = self.addon.clients.get(client_id)
        if state is not None:
            state.owner.answer_and_close(answer)

    async def wait_closed(self, timeout_s: float) -> None:
        """Let the tasks of closed connections (a pending decision, mitmproxy's teardown) finish, up to `timeout_s`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def next_id(self) -> str:
        return f"conn-{next(self._ids)}"

    def is_self(self, address: tuple[str, int]) -> bool:
        return dials_itself(address, (self.own_host, self.own_port)) or (
            self.addon.gate.dials_itself(address[0], address[1]) is not None
        )

    def spawn(self, coroutine: Awaitable[Any], connection: Session | None = None) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if connection is not None:
            task.add_done_callback(connection.task_done)
        return task
