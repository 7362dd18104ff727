"""Worker processes: `workers: N` (or `auto`) runs N copies of the gateway that accept on one listening socket.

Owns `resolve_workers` and `supervise`. The supervisor binds the proxy's socket once, forks the workers (before any
event loop or thread exists in this process), and then only supervises: it serves the admin listener (`/readyz` =
every worker ready, `/healthz` = every worker alive, `/metrics` = every worker's metrics with a `worker` label),
forwards SIGTERM/SIGINT, and exits 0 once every worker has drained, or 1 if a worker died. Each worker is a complete
gateway (its own policy source, engine, recorder, limits; `limits.max_connections` is per worker) with its admin
listener on an ephemeral loopback port; only worker 0 writes Kubernetes status. Imports the app and admin modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from egress_gateway.admin import AdminServer
from egress_gateway.app import Gateway, event_loop_factory, serve
from egress_gateway.logging import setup_logging
from egress_gateway.proxy.embedded import listening_socket
from egress_gateway.proxy.resolver import Resolver
from egress_gateway.settings import Settings, split_hostport

log = structlog.get_logger("egress_gateway.supervisor")


def resolve_workers(value: int | str) -> int:
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return max(1, int(value))


@dataclass
class _Worker:
    index: int
    pid: int
    report_fd: int
    admin_port: int | None = None
    exit_code: int | None = None


def _worker_settings(settings: Settings, index: int) -> Settings:
    # The supervisor's admin port stays a port of this gateway for each worker's self-dial check.
    supervisor_admin_port = split_hostport(settings.admin_listen)[1]
    update: dict[str, object] = {
        "admin_listen": "127.0.0.1:0",
        "workers": 1,
        "own_ports": [*settings.own_ports, supervisor_admin_port],
    }
    if index > 0:
        update["kubernetes"] = settings.kubernetes.model_copy(update={"write_status": False})
    return settings.model_copy(update=update)


def _whole_line_stderr(settings: Settings) -> None:
    """Several processes share stderr: buffer each log line and write it with one write(), so lines from different
    workers never interleave mid-line (print() would write the text and the newline separately)."""
    raw = io.FileIO(2, "w", closefd=False)
    sys.stderr = io.TextIOWrapper(
        io.BufferedWriter(raw, buffer_size=1 << 16), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    setup_logging(settings.log.level, settings.log.format)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGTERM if the supervisor dies (e.g. SIGKILL), so no orphan keeps the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _run_worker(settings: Settings, index: int, sock: socket.socket, report_fd: int) -> int:
    _die_with_parent()
    _whole_line_stderr(settings)
    structlog.contextvars.bind_contextvars(worker=index)

    def started(gateway: Gateway) -> None:
        os.write(report_fd, f"{gateway.admin_addresses[0][1]}\n".encode())
        os.close(report_fd)

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(serve(_worker_settings(settings, index), listen_socket=sock, on_started=started))


def supervise(settings: Settings, workers: int) -> int:
    try:  # configuration errors once, here, with exit code 2, rather than once per worker
        Resolver(settings.resolver.hosts, settings.resolver.nameservers, settings.resolver.timeout_s)
    except ValueError as exc:
        log.error("configuration_error", error=str(exc))
        return 2
    host, port = split_hostport(settings.listen)
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        log.error("startup_failed", error=f"cannot listen on {settings.listen}: {exc}")
        return 1
    bound_host, bound_port = sock.getsockname()[:2]
    listening = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    started: list[_Worker] = []
    for index in range(workers):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(read_fd)
            code = 1
            try:
                code = _run_worker(settings, index, sock, write_fd)
            finally:
                os._exit(code)
        os.close(write_fd)
        started.append(_Worker(index, pid, read_fd))
    sock.close()  # the workers hold it
    _whole_line_stderr(settings)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(_Supervisor(settings, started, listening).run())


class _Supervisor:
    def __init__(self, settings: Settings, workers: list[_Worker], listening: str) -> None:
        self.settings = settings
        self.workers = workers
        self.listening = listening
        self.stopping = False
        self.failed = False
        self._stop = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        admin_host, admin_port = split_hostport(self.settings.admin_listen)
        admin = AdminServer(admin_host, admin_port, self.readiness, self.liveness, self.metrics)
        tasks = [asyncio.create_task(self._read_admin_port(w)) for w in self.workers]
        tasks.append(asyncio.create_task(self._reap()))
        try:
            addresses = await admin.start()
        except OSError as exc:
            log.error("startup_failed", error=f"cannot listen on {self.settings.admin_listen}: {exc}")
            self._stop.set()
            self.failed = True
            addresses = []
        await self._wait_for_reports()
        if not self._stop.is_set():
            self._log_listening(addresses)
        await self._stop.wait()
        await self._stop_workers()
        for task in tasks:
            task.cancel()
        await admin.stop()
        await self._session.close()
        codes = [w.exit_code for w in self.workers]
        log.info("gateway_stopped", workers=len(self.workers), exit_codes=codes)
        return 0 if not self.failed and all(code == 0 for code in codes) else 1

    def _log_listening(self, addresses: list[tuple[str, int]]) -> None:
        log.info(
            "gateway_listening",
            listen=[self.listening],
            admin=[f"{h}:{p}" for h, p in addresses],
            workers=len(self.workers),
            pids=[w.pid for w in self.workers],
        )

    async def _wait_for_reports(self) -> None:
        while not self._stop.is_set() and any(w.admin_port is None and w.exit_code is None for w in self.workers):
            await asyncio.sleep(0.05)

    async def _read_admin_port(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(worker.report_fd, "rb", buffering=0)
        )
        try:
            line = await reader.readline()
            if line.strip().isdigit():
                worker.admin_port = int(line)
        finally:
            transport.close()

    async def _reap(self) -> None:
        """Notice workers that exit; one that exits while we are not stopping takes the gateway down (exit 1)."""
        while True:
            for worker in self.workers:
                if worker.exit_code is not None:
                    continue
                with contextlib.suppress(ChildProcessError):
                    pid, status = os.waitpid(worker.pid, os.WNOHANG)
                    if pid == 0:
                        continue
                    worker.exit_code = os.waitstatus_to_exitcode(status)
                    if not self.stopping:
                        log.error("worker_exited", worker=worker.index, pid=worker.pid, exit_code=worker.exit_code)
                        self.failed = True
                        self._stop.set()
            await asyncio.sleep(0.1)

    async def _stop_workers(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 10
        while any(w.exit_code is None for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in self.workers:
            if worker.exit_code is None:
                log.error("worker_killed", worker=worker.index, pid=worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.exit_code = -9

    # ---- admin ---------------------------------------------------------------------------------------------------
    def liveness(self) -> tuple[bool, str]:
        dead = [w.index for w in self.workers if w.exit_code is not None]
        if dead:
            return False, f"worker(s) {dead} exited"
        return True, f"ok ({len(self.workers)} workers)"

    async def _get(self, worker: _Worker, path: str) -> tuple[int, str]:
        if worker.admin_port is None or self._session is None:
            return 503, "starting"
        try:
            async with self._session.get(f"http://127.0.0.1:{worker.admin_port}{path}") as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 503, f"unreachable ({exc.__class__.__name__})"

    async def readiness(self) -> tuple[bool, str]:
        answers = await asyncio.gather(*(self._get(w, "/readyz") for w in self.workers))
        waiting = [
            f"worker {w.index}: {text.strip()}"
            for w, (status, text) in zip(self.workers, answers, strict=True)
            if status != 200
        ]
        if waiting:
            return False, "; ".join(waiting)
        return True, f"ready ({len(self.workers)} workers; {answers[0][1].strip()})"

    async def metrics(self) -> bytes:
        answers = await asyncio.gather(*(self._get(w, "/metrics") for w in self.workers))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(
            _Merged(
                [(str(w.index), text) for w, (status, text) in zip(self.workers, answers, strict=True) if status == 200]
            )
        )
        return generate_latest(registry)


class _Merged:
    """Every worker's metric families, each sample labelled with its `worker`."""

    def __init__(self, texts: Iterable[tuple[str, str]]) -> None:
        self.texts = list(texts)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for worker, text in self.texts:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    labels = {**sample.labels, "worker": worker}
                    merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))
        return list(families.values())
