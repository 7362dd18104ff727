"""Built-in retention of the trail file (docs/audit.md, "Exporters"): `due` says when the live file is rotated, by
size or age (the writer asks before each batch); `rotate` shifts `path.N[.gz]` up (deleting beyond `keep`), renames
the live file to `path.1` and gzips it on a background thread, through a hidden temporary file, one at a time.
"""

from __future__ import annotations

import gzip
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("egress_gateway.audit")


@dataclass
class Rotation:
    max_bytes: int = 0  # 0: no size limit
    max_age_s: float = 0.0  # 0: no age limit
    keep: int = 10  # rotated generations kept
    compress: bool = True
    _compressing: threading.Thread | None = field(default=None, repr=False)

    def due(self, size: int, opened_at: float) -> bool:
        if self.max_bytes and size >= self.max_bytes:
            return True
        return bool(self.max_age_s) and size > 0 and time.monotonic() - opened_at >= self.max_age_s

    def rotate(self, path: Path) -> None:
        """On the writer thread, with the live file closed."""
        self.wait()  # the previous generation is compressed before the names shift
        for index in range(self.keep, 0, -1):
            for suffix in (".gz", ""):
                older = Path(f"{path}.{index}{suffix}")
                if not older.exists():
                    continue
                if index >= self.keep:
                    older.unlink()
                else:
                    older.rename(f"{path}.{index + 1}{suffix}")
        if self.keep < 1:
            path.unlink(missing_ok=True)
            return
        first = Path(f"{path}.1")
        path.rename(first)
        log.info("audit_trail_rotated", path=str(path), rotated_to=str(first), compress=self.compress)
        if self.compress:
            self._compressing = threading.Thread(target=_gzip, args=(first,), name="audit-gzip", daemon=True)
            self._compressing.start()

    def wait(self) -> None:
        if self._compressing is not None:
            self._compressing.join()
            self._compressing = None


def _gzip(source: Path) -> None:
    target = Path(f"{source}.gz")
    hidden = source.parent / f".{target.name}.tmp"
    try:
        with open(source, "rb") as plain, gzip.open(hidden, "wb", compresslevel=1) as packed:
            shutil.copyfileobj(plain, packed, 1 << 20)
        os.chmod(hidden, os.stat(source).st_mode & 0o777)
        hidden.rename(target)
        source.unlink()
    except OSError as exc:
        log.warning("audit_trail_compress_failed", path=str(source), error=repr(exc))
        hidden.unlink(missing_ok=True)
