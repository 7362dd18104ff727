"""`egress-gateway run` as a subprocess, for tests: config written to a temp dir, ports chosen by the OS.

The gateway listens on 127.0.0.1:0; the real addresses come from its `gateway_listening` log line (JSON on
stderr). Every log line is kept in `events` so tests can wait for a specific one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


class GatewayProcess:
    def __init__(self, workdir: Path, config: dict[str, Any], policies: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.policies_dir = workdir / "policies"
        self.policies_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (policies or {}).items():
            (self.policies_dir / name).write_text(text)
        settings = {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:0",
            "policies_path": str(self.policies_dir),
            "log": {"level": "info", "format": "json"},
            "shutdown_grace_s": 5,
        }
        settings.update(config)
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.events: list[dict[str, Any]] = []
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self._lock = threading.Lock()

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0, extra_env: dict[str, str] | None = None) -> GatewayProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        env = {k: v for k, v in env.items() if not k.startswith("EGRESS_GATEWAY_") or k in (extra_env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "egress_gateway", "run", "--config", str(self.config_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr_lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout_lines), daemon=True).start()
        listening = self.wait_for("gateway_listening", lambda e: True, timeout=timeout)
        self.proxy_port = int(listening["listen"][0].rsplit(":", 1)[1])
        self.admin_port = int(listening["admin"][0].rsplit(":", 1)[1])
        return self

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self._lock:
                sink.append(line)
                if sink is self.stderr_lines:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        self.events.append(event)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    # ---- observation --------------------------------------------------------------------------------------------
    def wait_for(
        self, event: str, predicate: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 15.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for item in self.events:
                    if item.get("event") == event and (predicate is None or predicate(item)):
                        return item
            if self.process is not None and self.process.poll() is not None:
                time.sleep(0.2)  # let the pumps drain
                with self._lock:
                    tail = "\n".join(self.stderr_lines[-30:])
                raise AssertionError(f"gateway exited ({self.process.returncode}) before {event!r}:\n{tail}")
            time.sleep(0.02)
        with self._lock:
            tail = "\n".join(self.stderr_lines[-30:])
        raise AssertionError(f"no {event!r} log line within {timeout} s; last lines:\n{tail}")

    def find(self, event: str, predicate: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == event and (predicate is None or predicate(e))]

    # ---- convenience --------------------------------------------------------------------------------------------
    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write_policy(self, name: str, text: str) -> None:
        """Replace a policy file atomically (write + rename), as an editor or a ConfigMap update would."""
        target = self.policies_dir / name
        tmp = self.policies_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(target)
