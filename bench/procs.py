"""Process plumbing for the benchmark: start/stop a server process and read CPU and memory of its whole tree.

CPU comes from /proc/<pid>/stat (utime + stime + cutime + cstime of every live process in the tree, so helpers that
were forked and reaped still count); memory from /proc/<pid>/status (VmRSS now, VmHWM peak). These are the figures
that do not depend on the load generator sharing the machine. Imports nothing from egress_gateway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int) -> float:
    """User + system CPU of the tree under `root`, including reaped children."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # fields[0] is state (stat field 3): utime/stime/cutime/cstime are stat fields 14-17.
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLOCK_TICKS


def cpu_user_system(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the tree under `root`, including reaped children."""
    user = system = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11]) + int(fields[13])
            system += int(fields[12]) + int(fields[14])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(root: int) -> float:
    """Resident memory of the tree now (sum of VmRSS; shared pages of forked workers count once per process)."""
    return sum(_status_kib(pid, "VmRSS") for pid in process_tree(root)) / 1024


def peak_rss_mib(root: int) -> float:
    """Sum of each live process's peak resident memory (VmHWM)."""
    return sum(_status_kib(pid, "VmHWM") for pid in process_tree(root)) / 1024


def wait_until[T](probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll `probe` until it returns something other than None/False, or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Server:
    """A server process started by the benchmark; its output goes to a log file (read it when it fails)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Server:
        out = log.open("wb")
        try:
            process = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            out.close()
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; last output:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process (its own session: helpers it forked get it too), SIGKILL after `timeout_s`."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
