"""Hold N idle tunnels open through a proxy: CONNECT, TLS handshake with the origin (so the proxy has dialed
upstream and spliced), then no traffic. Used to read the proxy's resident memory per open tunnel.

Bounded: a fixed number of connections, a deadline for opening them, everything closed on exit. Imports nothing
from egress_gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class IdleResult:
    opened: int
    failed: int
    rss_before_mib: float
    rss_open_mib: float

    @property
    def kib_per_tunnel(self) -> float:
        return (self.rss_open_mib - self.rss_before_mib) * 1024 / self.opened if self.opened else float("nan")


async def _open_tunnel(
    proxy_host: str, proxy_port: int, target: str, context: ssl.SSLContext, timeout_s: float
) -> asyncio.StreamWriter:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(proxy_host, proxy_port), timeout_s)
    try:
        writer.write(f"CONNECT {target}:443 HTTP/1.1\r\nHost: {target}:443\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        await asyncio.wait_for(writer.start_tls(context, server_hostname=target), timeout_s)
    except BaseException:
        writer.close()
        raise
    return writer


async def _hold(
    proxy: str, target: str, ca_file: str, count: int, rss: Callable[[], float], deadline_s: float, parallel: int
) -> IdleResult:
    split = urlsplit(proxy)
    host, port = split.hostname or "127.0.0.1", split.port or 3128
    context = ssl.create_default_context(cafile=ca_file)
    rss_before = rss()
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    gate = asyncio.Semaphore(parallel)
    deadline = time.monotonic() + deadline_s

    async def one() -> None:
        nonlocal failed
        async with gate:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failed += 1
                return
            try:
                writers.append(await _open_tunnel(host, port, target, context, min(remaining, 15)))
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
                failed += 1

    try:
        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(1.0)  # let the proxy settle (buffers, deferred frees) before reading its memory
        rss_open = rss()
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
    return IdleResult(len(writers), failed, rss_before, rss_open)


def hold_idle_tunnels(
    proxy: str,
    target: str,
    ca_file: str,
    count: int,
    rss: Callable[[], float],
    deadline_s: float = 120,
    parallel: int = 32,
) -> IdleResult:
    return asyncio.run(_hold(proxy, target, ca_file, count, rss, deadline_s, parallel))
