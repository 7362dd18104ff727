"""Process-wide logging setup for `egress-gateway run`: structlog lines on stderr, nothing else on stdout.

structlog itself is configured in one place, `audit.logs.configure_logging`; this module calls it and routes the
standard-library loggers (mitmproxy, asyncio, the kubernetes client) through it, quietened to warnings so that the
proxy core's per-connection chatter costs nothing on the data path. Imports structlog and the audit log setup only.
"""

from __future__ import annotations

import logging
from typing import Literal

import structlog

from egress_gateway.audit.logs import configure_logging

# Libraries that log per connection at INFO; their warnings and errors still come through.
_QUIET = ("mitmproxy", "asyncio", "kubernetes", "urllib3", "watchfiles", "hpack", "aiohttp.access")


class StructlogHandler(logging.Handler):
    """Forwards standard-library log records to structlog, keeping the logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(record.name)
            fields = {"logger": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info  # type: ignore[assignment]
            logger.log(record.levelno, record.getMessage(), **fields)
        except Exception:  # a log line must never break the data path
            self.handleError(record)


def setup_logging(
    level: Literal["debug", "info", "warning", "error"] = "info", fmt: Literal["json", "console"] = "json"
) -> None:
    configure_logging(level, fmt, cache_loggers=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(StructlogHandler())
    root.setLevel(getattr(logging, level.upper()))
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
