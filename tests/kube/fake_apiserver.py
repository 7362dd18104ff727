"""A fake Kubernetes API server over real HTTP, following the list/watch protocol closely enough to test against.

What it implements, the way kube-apiserver does:
- a cluster-wide resourceVersion counter; every write stamps `metadata.resourceVersion`; `metadata.generation`
  starts at 1 and grows only when `spec` changes (status writes do not bump it);
- list with `metadata.resourceVersion`, `limit`/`continue` paging, `labelSelector` and `fieldSelector`;
- watch (`?watch=true`) from a resourceVersion as a chunked stream of JSON lines, BOOKMARK events when
  `allowWatchBookmarks=true`, `timeoutSeconds` ending the stream cleanly, an ERROR event with a 410 Status when
  the requested resourceVersion was compacted away, ADDED/DELETED synthesized when an object moves in or out of
  a field/label selector;
- the status subresource (merge-patch of `status` only; 409 when the patch's `metadata.resourceVersion` is stale),
  TokenReview, and coordination.k8s.io Leases with optimistic concurrency (409 on a stale resourceVersion);
- bearer-token authentication (401 otherwise); every request is logged with the token that made it.

Test controls (thread-safe, called from the test thread): `put`, `delete`, `compact`, `go_down`/`come_up`,
`cut_watches(mid_event=True)`, `hang`/`answer_again`, `fail_next`, `add_token`, `add_review_token`, `requests`.
Runs its own event loop in a daemon thread. Imports nothing from egress_gateway.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

Obj = dict[str, Any]
Key = tuple[str | None, str]  # (namespace, name)

# resource path segment -> (apiVersion, kind, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "egresspolicies": ("egressgateway.io/v1alpha2", "EgressPolicy", True),
    "clusteregresspolicies": ("egressgateway.io/v1alpha2", "ClusterEgressPolicy", False),
    "pods": ("v1", "Pod", True),
    "namespaces": ("v1", "Namespace", False),
    "serviceaccounts": ("v1", "ServiceAccount", True),
    "leases": ("coordination.k8s.io/v1", "Lease", True),
}
_GROUP_PREFIX = {
    "egresspolicies": "/apis/egressgateway.io/v1alpha2",
    "clusteregresspolicies": "/apis/egressgateway.io/v1alpha2",
    "pods": "/api/v1",
    "namespaces": "/api/v1",
    "serviceaccounts": "/api/v1",
    "leases": "/apis/coordination.k8s.io/v1",
}


_MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")


def _now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _lookup(obj: Obj, dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _field_value(obj: Obj, key: str) -> str:
    value = _lookup(obj, key)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def parse_selector(text: str | None) -> list[tuple[str, str, str | None]]:
    """'a=b,c!=d,e,!f' -> [(key, op, value)]; ops: '=', '!=', 'exists', '!exists'."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        if "!=" in part:
            key, value = part.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "==" in part:
            key, value = part.split("==", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif "=" in part:
            key, value = part.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif part.startswith("!"):
            terms.append((part[1:].strip(), "!exists", None))
        else:
            terms.append((part, "exists", None))
    return terms


def _labels_match(obj: Obj, terms: list[tuple[str, str, str | None]]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, value in terms:
        if (op == "=" and labels.get(key) != value) or (op == "!=" and labels.get(key) == value):
            return False
        if (op == "exists" and key not in labels) or (op == "!exists" and key in labels):
            return False
    return True


def _fields_match(obj: Obj, terms: list[tuple[str, str, str | None]]) -> bool:
    for key, op, value in terms:
        actual = _field_value(obj, key)
        if (op == "=" and actual != value) or (op == "!=" and actual == value):
            return False
    return True


@dataclass
class _Watcher:
    resource: str
    namespace: str | None
    labels: list[tuple[str, str, str | None]]
    fields: list[tuple[str, str, str | None]]
    queue: asyncio.Queue[tuple[str, Obj | None, Obj | None] | None] = field(default_factory=asyncio.Queue)
    response: web.StreamResponse | None = None
    request: web.Request | None = None

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return _labels_match(obj, self.labels) and _fields_match(obj, self.fields)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    token: str | None
    status: int


class FakeApiServer:
    def __init__(self, *, bookmark_interval_s: float = 1.0, tokens: tuple[str, ...] = ("test-token",)) -> None:
        self.bookmark_interval_s = bookmark_interval_s
        self._tokens = set(tokens)
        self._objects: dict[str, dict[Key, Obj]] = {name: {} for name in RESOURCES}
        self._log: list[tuple[int, str, str, Obj | None, Obj | None]] = []  # (rv, resource, type, old, new)
        self._rv = 100
        self._compacted_rv = 0
        self._watchers: list[_Watcher] = []
        self._snapshots: dict[str, tuple[int, list[Obj]]] = {}
        self._review_tokens: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self.requests: list[RequestRecord] = []
        self.fail_next: dict[str, int] = {}  # path prefix -> HTTP status to answer once
        self._answering: asyncio.Event | None = None  # cleared = accept connections but never answer (`hang`)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-apiserver", daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeApiServer:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        if self._answering is not None:
            self._answering.set()
        self._abort_watches(mid_event=False)
        if self._runner is not None:
            await self._runner.cleanup()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        if self.port == 0:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            sock.close()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    def go_down(self) -> None:
        """Stop listening and drop every open watch (connections to the port are refused until `come_up`)."""

        async def down() -> None:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            self._abort_watches(mid_event=False)

        self._call(down())

    def come_up(self) -> None:
        self._call(self._listen())

    def kubeconfig(self, path: Path, token: str = "test-token") -> Path:
        self.add_token(token)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        path.write_text(json.dumps(config))
        return path

    def add_token(self, token: str) -> None:
        with self._lock:
            self._tokens.add(token)

    # ---------------------------------------------------------------- test controls
    def put(self, obj: Obj) -> Obj:
        """Create or replace an object (spec changes bump generation). Returns the stored copy."""
        return self._call(self._put(obj))

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        self._call(self._delete(resource, namespace, name))

    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        with self._lock:
            found = self._objects[resource].get((namespace, name))
            return copy.deepcopy(found) if found else None

    def list(self, resource: str) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._objects[resource].values()]

    @property
    def resource_version(self) -> int:
        return self._rv

    def compact(self) -> None:
        """Forget history: watches from any older resourceVersion now get 410 Gone."""
        with self._lock:
            self._compacted_rv = self._rv
            self._log.clear()
            self._snapshots.clear()

    def cut_watches(self, mid_event: bool = True) -> None:
        """Abort every open watch connection, optionally after writing half of an event."""
        self._loop.call_soon_threadsafe(self._abort_watches, mid_event)

    def watch_count(self, resource: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if resource is None or w.resource == resource)

    def add_review_token(
        self,
        token: str,
        *,
        username: str,
        audiences: list[str],
        exp: float,
        extra: dict[str, list[str]] | None = None,
        uid: str = "",
    ) -> None:
        """Register a ServiceAccount token TokenReview will accept (for the listed audiences, until `exp`)."""
        with self._lock:
            self._review_tokens[token] = {
                "username": username,
                "audiences": audiences,
                "exp": exp,
                "extra": extra or {},
                "uid": uid or str(uuid.uuid4()),
            }

    def remove_review_token(self, token: str) -> None:
        """TokenReview stops accepting `token` (as kube-apiserver does when the pod it is bound to is deleted)."""
        with self._lock:
            self._review_tokens.pop(token, None)

    def requests_matching(self, predicate: Callable[[RequestRecord], bool]) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    # ---------------------------------------------------------------- storage
    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    async def _put(self, obj: Obj) -> Obj:
        resource = self._resource_of(obj)
        with self._lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            key = (meta.get("namespace"), meta["name"])
            old = self._objects[resource].get(key)
            if old is None:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now_rfc3339())
                meta["generation"] = 1
            else:
                meta["uid"] = old["metadata"]["uid"]
                meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
                same_spec = old.get("spec") == obj.get("spec")
                meta["generation"] = old["metadata"].get("generation", 1) + (0 if same_spec else 1)
                if "status" not in obj and "status" in old and RESOURCES[resource][0].startswith("egress"):
                    obj["status"] = old["status"]
            meta["resourceVersion"] = str(self._next_rv())
            self._objects[resource][key] = obj
            self._record(resource, "MODIFIED" if old else "ADDED", old, obj)
            return copy.deepcopy(obj)

    async def _delete(self, resource: str, namespace: str | None, name: str) -> None:
        with self._lock:
            old = self._objects[resource].pop((namespace, name), None)
            if old is None:
                return
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._next_rv())
            self._record(resource, "DELETED", old, gone)

    def _record(self, resource: str, kind: str, old: Obj | None, new: Obj | None) -> None:
        # Stored objects are replaced on every write, never mutated, so references are snapshots.
        self._log.append((self._rv, resource, kind, old, new))
        for watcher in self._watchers:
            if watcher.resource == resource:
                watcher.queue.put_nowait((kind, old, new))

    @staticmethod
    def _resource_of(obj: Obj) -> str:
        for name, (_, kind, _) in RESOURCES.items():
            if kind == obj.get("kind"):
                return name
        raise ValueError(f"unknown kind {obj.get('kind')!r}")

    # ---------------------------------------------------------------- HTTP
    def hang(self) -> None:
        """Keep accepting connections but answer nothing (requests wait until `answer_again`)."""

        def clear() -> None:
            if self._answering is None:
                self._answering = asyncio.Event()
            self._answering.clear()

        self._loop.call_soon_threadsafe(clear)

    def answer_again(self) -> None:
        self._loop.call_soon_threadsafe(lambda: self._answering.set() if self._answering else None)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self._answering is not None:
            await self._answering.wait()
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        response = await self._handle(request, token)
        with self._lock:
            self.requests.append(
                RequestRecord(request.method, request.path, dict(request.query), token, response.status)
            )
        return response

    async def _handle(self, request: web.Request, token: str | None) -> web.StreamResponse:
        if token not in self._tokens:
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        for prefix, code in list(self.fail_next.items()):
            if request.path.startswith(prefix):
                del self.fail_next[prefix]
                return web.json_response(_status(code, "InternalError", "injected failure"), status=code)
        if request.path == "/apis/authentication.k8s.io/v1/tokenreviews" and request.method == "POST":
            return await self._token_review(request)
        route = self._route(request.path)
        if route is None:
            return web.json_response(_status(404, "NotFound", f"no route {request.path}"), status=404)
        resource, namespace, name, sub = route
        if request.method == "GET" and name is None:
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, resource, namespace)
            return self._list(request, resource, namespace)
        if request.method == "GET" and name is not None:
            with self._lock:
                found = self._objects[resource].get((namespace, name))
            if found is None:
                return web.json_response(_status(404, "NotFound", f'{resource} "{name}" not found'), status=404)
            return web.json_response(found)
        if request.method == "PATCH" and sub == "status":
            return await self._patch_status(request, resource, namespace, name)
        if request.method in ("POST", "PUT") and resource == "leases":
            return await self._write_lease(request, namespace, name)
        return web.json_response(_status(405, "MethodNotAllowed", "not supported by the fake"), status=405)

    @staticmethod
    def _route(path: str) -> tuple[str, str | None, str | None, str | None] | None:
        for resource, prefix in _GROUP_PREFIX.items():
            if not path.startswith(prefix + "/"):
                continue
            parts = path[len(prefix) + 1 :].split("/")
            namespace = None
            if parts[0] == "namespaces" and len(parts) >= 3 and RESOURCES[resource][2]:
                namespace, parts = parts[1], parts[2:]
            if parts[0] != resource:
                continue
            name = parts[1] if len(parts) > 1 else None
            sub = parts[2] if len(parts) > 2 else None
            return resource, namespace, name, sub
        return None

    def _selected(self, resource: str, namespace: str | None, query: Any) -> list[Obj]:
        labels = parse_selector(query.get("labelSelector"))
        fields = parse_selector(query.get("fieldSelector"))
        out = []
        for obj in self._objects[resource].values():
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                continue
            if _labels_match(obj, labels) and _fields_match(obj, fields):
                out.append(obj)
        out.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return out

    def _list(self, request: web.Request, resource: str, namespace: str | None) -> web.Response:
        api_version, kind, _ = RESOURCES[resource]
        limit = int(request.query.get("limit") or 0)
        cont = request.query.get("continue")
        with self._lock:
            if cont:
                if cont not in self._snapshots:
                    body = _status(410, "Expired", "The provided continue parameter is too old")
                    return web.json_response(body, status=410)
                rv, items = self._snapshots.pop(cont)
            else:
                rv, items = (
                    self._rv,
                    list(self._selected(resource, namespace, request.query)),
                )
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            meta: Obj = {"resourceVersion": str(rv)}
            if rest:
                token = uuid.uuid4().hex
                self._snapshots[token] = (rv, rest)
                meta["continue"] = token
                meta["remainingItemCount"] = len(rest)
        return web.json_response(
            {"apiVersion": api_version, "kind": f"{kind}List", "metadata": meta, "items": page},
            dumps=json.dumps,
        )

    async def _watch(self, request: web.Request, resource: str, namespace: str | None) -> web.StreamResponse:
        query = request.query
        since = query.get("resourceVersion") or "0"
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        watcher = _Watcher(
            resource,
            namespace,
            parse_selector(query.get("labelSelector")),
            parse_selector(query.get("fieldSelector")),
            request=request,
        )
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        watcher.response = response
        # Registered before the headers go out: a client that saw 200 is reachable by go_down/cut_watches.
        with self._lock:
            backlog: list[tuple[str, Obj | None, Obj | None]] = []
            gone = since != "0" and int(since) < self._compacted_rv
            if since == "0":
                backlog = [("ADDED", None, o) for o in self._selected(resource, namespace, query)]
            elif not gone:
                backlog = [(k, o, n) for rv, r, k, o, n in self._log if r == resource and rv > int(since)]
            self._watchers.append(watcher)
        try:
            await response.prepare(request)
            if gone:
                status = _status(410, "Expired", f"too old resource version: {since} ({self._compacted_rv})")
                await response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")
                return response
            for item in backlog:
                await self._send(watcher, *item)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                wait = min(left, self.bookmark_interval_s) if bookmarks else left
                try:
                    item_or_none = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    if bookmarks and time.monotonic() < deadline:
                        api_version, kind, _ = RESOURCES[resource]
                        mark = {
                            "kind": kind,
                            "apiVersion": api_version,
                            "metadata": {"resourceVersion": str(self._rv)},
                        }
                        await response.write(json.dumps({"type": "BOOKMARK", "object": mark}).encode() + b"\n")
                    continue
                if item_or_none is None:
                    break
                await self._send(watcher, *item_or_none)
            return response
        except (ConnectionResetError, RuntimeError):
            return response
        finally:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

    async def _send(self, watcher: _Watcher, kind: str, old: Obj | None, new: Obj | None) -> None:
        was, now = watcher.matches(old), watcher.matches(new)
        if kind == "DELETED":
            event = ("DELETED", new) if was else None
        elif was and now:
            event = ("MODIFIED", new)
        elif now:
            event = ("ADDED", new)
        elif was:
            event = ("DELETED", new)  # left the selection
        else:
            event = None
        if event is not None and watcher.response is not None:
            line = json.dumps({"type": event[0], "object": event[1]}).encode() + b"\n"
            await watcher.response.write(line)

    def _abort_watches(self, mid_event: bool) -> None:
        for watcher in list(self._watchers):
            request = watcher.request
            if request is None or request.transport is None:
                continue
            if mid_event:
                # half an event inside a well-formed chunk, then the connection dies
                half = b'{"type":"MODIFIED","object":{"kind":'
                request.transport.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
            request.transport.abort()
            watcher.queue.put_nowait(None)

    async def _patch_status(
        self, request: web.Request, resource: str, namespace: str | None, name: str | None
    ) -> web.Response:
        if request.content_type != "application/merge-patch+json":
            msg = (
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/merge-patch+json (got {request.content_type})"
            )
            return web.json_response(_status(415, "UnsupportedMediaType", msg), status=415)
        patch = await request.json()
        with self._lock:
            old = self._objects[resource].get((namespace, name or ""))
            if old is None:
                return web.json_response(_status(404, "NotFound", f'"{name}" not found'), status=404)
            precondition = (patch.get("metadata") or {}).get("resourceVersion")
            if precondition and precondition != old["metadata"]["resourceVersion"]:
                msg = "the object has been modified; please apply your changes to the latest version and try again"
                return web.json_response(_status(409, "Conflict", msg), status=409)
            new = copy.deepcopy(old)
            if "status" in patch:
                new["status"] = _merge(new.get("status") or {}, patch["status"])
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            self._objects[resource][(namespace, name or "")] = new
            self._record(resource, "MODIFIED", old, new)
            return web.json_response(copy.deepcopy(new))

    async def _write_lease(self, request: web.Request, namespace: str | None, name: str | None) -> web.Response:
        body = await request.json()
        for field_name in ("acquireTime", "renewTime"):  # MicroTime: RFC 3339 with exactly 6 fraction digits
            value = (body.get("spec") or {}).get(field_name)
            if value is not None and not _MICRO_TIME.match(str(value)):
                msg = f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse'
                return web.json_response(_status(400, "BadRequest", msg), status=400)
        meta = body.setdefault("metadata", {})
        meta["namespace"] = namespace
        key = (namespace, name or meta.get("name"))
        with self._lock:
            old = self._objects["leases"].get(key)
            if request.method == "POST" and old is not None:
                return web.json_response(_status(409, "AlreadyExists", "lease exists"), status=409)
            if request.method == "PUT":
                if old is None:
                    return web.json_response(_status(404, "NotFound", "lease not found"), status=404)
                if meta.get("resourceVersion") != old["metadata"]["resourceVersion"]:
                    msg = "Operation cannot be fulfilled on leases: the object has been modified"
                    return web.json_response(_status(409, "Conflict", msg), status=409)
            body["apiVersion"], body["kind"] = "coordination.k8s.io/v1", "Lease"
        stored = await self._put(body)
        return web.json_response(stored, status=201 if request.method == "POST" else 200)

    async def _token_review(self, request: web.Request) -> web.Response:
        review = await request.json()
        token = review.get("spec", {}).get("token", "")
        wanted = review.get("spec", {}).get("audiences") or []
        with self._lock:
            known = self._review_tokens.get(token)
        status: Obj
        if known is None:
            status = {"authenticated": False, "error": "invalid bearer token"}
        elif known["exp"] <= time.time():
            status = {"authenticated": False, "error": "token has expired"}
        elif wanted and not set(wanted) & set(known["audiences"]):
            status = {"authenticated": False, "error": "token audiences don't match"}
        else:
            status = {
                "authenticated": True,
                "audiences": [a for a in known["audiences"] if not wanted or a in wanted],
                "user": {
                    "username": known["username"],
                    "uid": known["uid"],
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "extra": known["extra"],
                },
            }
        out = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": review.get("spec", {}),
            "status": status,
        }
        return web.json_response(out, status=201)


def _merge(base: Obj, patch: Obj) -> Obj:
    """RFC 7386 JSON merge patch."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
