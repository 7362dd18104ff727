"""`egress-gateway run` writes the JSON lines logged on its event loop with at most two writes per loop iteration
(`LineBatcher`: the first line at once, the others together at the iteration's end): in order, at once off the
loop, and all of them by the time the process exits on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from pathlib import Path

import structlog

from egress_gateway.logging import LineBatcher, configure_logging
from tests.support.gateway import GatewayProcess


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def _events(stream: CountingStream) -> list[str]:
    return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]


def test_the_first_line_of_an_iteration_is_written_at_once_the_others_together_at_its_end() -> None:
    stream = CountingStream()
    configure_logging("info", "json", lines=LineBatcher(stream))
    log = structlog.get_logger("test")

    async def main() -> list[str]:
        for index in range(5):
            log.info(f"line{index}")
        log.warning("warned")
        written_in_the_iteration = _events(stream)
        await asyncio.sleep(0)  # the next iteration: the batch is written
        await asyncio.sleep(0)
        return written_in_the_iteration

    try:
        assert asyncio.run(main()) == ["line0"]
    finally:
        structlog.reset_defaults()
    assert _events(stream) == ["line0", "line1", "line2", "line3", "line4", "warned"]
    assert stream.writes == 2


def test_a_line_off_the_loop_is_written_at_once_after_what_the_loop_gathered() -> None:
    stream = CountingStream()
    configure_logging("info", "json", lines=LineBatcher(stream))
    log = structlog.get_logger("test")

    async def main() -> list[str]:
        log.info("on_loop")
        worker = threading.Thread(target=lambda: log.error("from_a_thread"))
        worker.start()
        worker.join()
        return _events(stream)

    try:
        assert asyncio.run(main()) == ["on_loop", "from_a_thread"]
        log.info("no_loop")
    finally:
        structlog.reset_defaults()
    assert _events(stream) == ["on_loop", "from_a_thread", "no_loop"]


def test_a_large_batch_is_written_before_the_iteration_ends() -> None:
    stream = CountingStream()
    configure_logging("info", "json", lines=LineBatcher(stream))
    log = structlog.get_logger("test")
    padding = "x" * 1000

    async def main() -> int:
        for _ in range(2 * LineBatcher.MAX_BATCH_BYTES // 1000):
            log.info("big", padding=padding)
        return len(_events(stream))

    try:
        written = asyncio.run(main())
    finally:
        structlog.reset_defaults()
    assert written > 0
    assert len(_events(stream)) == 2 * LineBatcher.MAX_BATCH_BYTES // 1000


def test_the_gateways_last_lines_are_written_when_it_stops_on_sigterm(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, {}).start()
    assert gateway.stop() == 0
    deadline = time.monotonic() + 5
    while not gateway.find("gateway_stopped") and time.monotonic() < deadline:
        time.sleep(0.05)  # the reader thread drains the pipe
    assert gateway.find("gateway_stopped")
