"""The list-then-watch loop for one resource (client-go's reflector, asyncio-native).

Owns: `Reflector`: a paged list (`limit`/`continue`), then a watch from the list's resourceVersion with
`allowWatchBookmarks` and a server-side `timeoutSeconds` (randomized, renewed quietly when it ends); bookmarks
move the resourceVersion forward; `410 Gone` (as a status or as an ERROR event) relists and hands the full
list to `on_replace` so the consumer can reconcile; any other error (refused connection, 5xx, stream cut mid-
event, garbage line) backs off with full jitter and re-watches from the last resourceVersion, forever.
Handlers run on the event loop, synchronously, in order. Also tracks staleness (seconds since the last moment
the cache was known in sync) and counters (`watch_restarts`, `relists`). Imports no gateway module; the data
path never calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import structlog

RawObject = dict[str, Any]
ListCall = Callable[..., Awaitable[aiohttp.ClientResponse]]

LIST_TIMEOUT_S = 60.0  # one list page; an API server that accepts and never answers is given up on after this
WATCH_TIMEOUT_MARGIN_S = 30.0  # client-side limit of a watch = its server-side timeoutSeconds + this


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Gone(ApiError):
    """The resourceVersion (or continue token) we asked for is no longer available: relist."""


class Backoff:
    """Exponential backoff with full jitter: sleep a random time in [base, min(cap, base * 2**attempt)]."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 30.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return random.uniform(self.base_s, max(self.base_s, ceiling))

    def reset(self) -> None:
        self.attempt = 0


async def read_json(response: aiohttp.ClientResponse) -> RawObject:
    """Read a whole (non-watch) response; raise `Gone`/`ApiError` for non-2xx answers."""
    try:
        body = await response.read()
    finally:
        response.release()
    if response.status >= 300:
        raise _error_from(response.status, body)
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ApiError(response.status, "expected a JSON object")
    return data


def _error_from(status: int, body: bytes) -> ApiError:
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode(errors="replace")
    return Gone(status, message) if status == 410 else ApiError(status, message)


class Reflector:
    def __init__(
        self,
        name: str,
        call: ListCall,
        *,
        on_replace: Callable[[list[RawObject]], Awaitable[None] | None],
        on_event: Callable[[str, RawObject], None],
        watch_timeout_s: float = 300.0,
        page_size: int = 500,
        backoff: Backoff | None = None,
        selectors: dict[str, str] | None = None,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._call = call
        self._on_replace = on_replace
        self._on_event = on_event
        self._watch_timeout_s = watch_timeout_s
        self._page_size = page_size
        self._backoff = backoff or Backoff()
        self._selectors = selectors or {}
        self._on_restart = on_restart or (lambda reason: None)
        self._log = structlog.get_logger("egress_gateway.kube").bind(resource=name)
        self.resource_version: str | None = None
        self.synced = False
        self.synced_event = asyncio.Event()
        self.connected = False
        self.watch_restarts = 0
        self.relists = 0
        self.events = 0
        self._last_ok: float | None = None
        self._last_list: float | None = None
        self._failing_since: float | None = None

    # ------------------------------------------------------------------ state
    def staleness_seconds(self) -> float | None:
        """None before the first list; 0 while a watch stream is open; else seconds since it last was."""
        if self._last_ok is None:
            return None
        if self.connected:
            return 0.0
        return max(0.0, time.monotonic() - self._last_ok)

    def _mark_ok(self) -> None:
        self._last_ok = time.monotonic()

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                self._backoff.reset()
            except asyncio.CancelledError:
                self.connected = False
                raise
            except Gone as exc:
                self.connected = False
                self.relists += 1
                self.resource_version = None
                self._on_restart("expired")
                self._log.info("kube_watch_expired", error=str(exc), relists=self.relists)
                if self._last_list is not None and time.monotonic() - self._last_list < 1.0:
                    await asyncio.sleep(self._backoff.next_delay())  # a server that expires every list at once
            except Exception as exc:
                self.connected = False
                self.watch_restarts += 1
                self._on_restart("error")
                delay = self._backoff.next_delay()
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                self._log.warning(
                    "kube_watch_error",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 3),
                    staleness_s=self.staleness_seconds(),
                    synced=self.synced,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        items: list[RawObject] = []
        params: dict[str, Any] = dict(self._selectors)
        cont: str | None = None
        resource_version = ""
        while True:
            if cont:
                params["_continue"] = cont
            response = await self._call(limit=self._page_size, _request_timeout=LIST_TIMEOUT_S, **params)
            page = await read_json(response)
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or "")
            cont = meta.get("continue") or None
            if not cont:
                break
        if not resource_version:
            raise ApiError(200, "list response carries no metadata.resourceVersion")
        replaced = self._on_replace(items)
        if inspect.isawaitable(replaced):
            await replaced  # a consumer that yields to the event loop while it digests a large list
        self._last_list = time.monotonic()
        self.resource_version = resource_version
        self._mark_ok()
        self._recovered()
        if not self.synced:
            self.synced = True
            self.synced_event.set()
            self._log.info("kube_list_synced", objects=len(items), resource_version=resource_version)

    async def _watch(self) -> None:
        timeout = int(self._watch_timeout_s * random.uniform(1.0, 2.0))
        response = await self._call(
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=max(1, timeout),
            _request_timeout=float(timeout + WATCH_TIMEOUT_MARGIN_S),
            **self._selectors,
        )
        try:
            if response.status >= 300:
                raise _error_from(response.status, await response.read())
            self.connected = True
            self._mark_ok()
            self._recovered()
            self._backoff.reset()
            async for line in response.content:
                if line.strip():
                    self._dispatch(line)
            # The server ended the stream (timeoutSeconds): renew quietly from where we are.
            self._on_restart("timeout")
        finally:
            if self.connected:
                self._mark_ok()  # everything up to the end of an open stream was seen: in sync until now
            self.connected = False
            response.release()

    def _dispatch(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(200, f"malformed watch event ({exc}): {line[:120]!r}") from None
        if kind == "ERROR":
            code = int(obj.get("code") or 500) if isinstance(obj, dict) else 500
            message = str(obj.get("message", "")) if isinstance(obj, dict) else str(obj)
            raise Gone(code, message) if code == 410 else ApiError(code, message)
        version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._on_event(kind, obj)
            self.events += 1
        elif kind != "BOOKMARK":
            self._log.warning("kube_watch_unknown_event", type=kind)
            return
        if version:
            self.resource_version = str(version)
        self._mark_ok()

    def _recovered(self) -> None:
        if self._failing_since is not None:
            self._log.info("kube_watch_recovered", outage_s=round(time.monotonic() - self._failing_since, 3))
            self._failing_since = None


def watch_backoff(cap_s: float) -> Backoff:
    """The backoff every watch uses: from 0.2 s (or the cap, if lower) up to the cap, with jitter."""
    return Backoff(base_s=min(0.2, cap_s), cap_s=cap_s)


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until each has ended, whatever it raised."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def wait_synced(reflectors: Iterable[Reflector], timeout: float) -> None:
    """Wait until every reflector finished its first full list, or the timeout passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(r.synced_event.wait() for r in reflectors))
