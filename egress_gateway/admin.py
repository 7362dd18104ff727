"""The admin HTTP listener: `/healthz` (the process is alive), `/readyz` (policies loaded), `/metrics` (Prometheus).

Owns only this small HTTP surface (aiohttp). `/metrics` serves the default `prometheus_client` registry, on which
`egress_gateway/metrics.py` defines the gateway's metrics. Imports nothing from the proxy or the engine: readiness
is a callable handed in by `app.py`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

Check = Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]]  # (ok, one-line reason)


async def _result(check: Check) -> tuple[bool, str]:
    value = check()
    if isinstance(value, tuple):
        return value
    return await value


def build_app(readiness: Check) -> web.Application:
    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(status=200, text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        ready, reason = await _result(readiness)
        return web.Response(status=200 if ready else 503, text=f"{reason}\n")

    async def serve_metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(REGISTRY))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", serve_metrics)
    return app


class AdminServer:
    def __init__(self, host: str, port: int, readiness: Check) -> None:
        self.host = host
        self.port = port
        self._runner = web.AppRunner(build_app(readiness), access_log=None, handle_signals=False, shutdown_timeout=1.0)

    async def start(self) -> list[tuple[str, int]]:
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    async def stop(self) -> None:
        await self._runner.cleanup()
