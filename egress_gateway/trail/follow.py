"""`audit --follow`: tail a live trail file, one line per connection as it is decided, like `hubble observe -f`.

Starts at the end of the file and follows it across rotation (when the path names a new file, it is read from its
start). A connection is shown at its `open` record (its decision, within `audit.flush_interval_s`); a close record
whose open record was not seen (opened before following began) is shown at close. Lines that are not records
(checkpoints, policy records, a line still being written) are skipped. Pure reading: must not import the proxy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from egress_gateway.trail.read import FlowFilter, FlowRecord
from egress_gateway.trail.render import printable

POLL_S = 0.1
_MAX_REMEMBERED = 100_000  # open records whose close is awaited: bounded, the oldest forgotten first


def follow_records(path: Path, *, stop: Callable[[], bool] = lambda: False) -> Iterator[FlowRecord]:
    """Records appended to `path` from now on, until `stop()`; never ends on its own."""
    stream: IO[bytes] | None = None
    inode: int | None = None
    partial = b""
    shown: dict[tuple[str, str], None] = {}
    from_end = True  # the file as found: from its end; a file rotated in later: from its start
    while not stop():
        if stream is None:
            try:
                stream = open(path, "rb")  # noqa: SIM115 (kept open across iterations)
            except FileNotFoundError:
                time.sleep(POLL_S)
                continue
            inode = os.fstat(stream.fileno()).st_ino
            if from_end:
                stream.seek(0, os.SEEK_END)
                from_end = False
        chunk = stream.read()
        if chunk:
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                record = _record(line, shown)
                if record is not None:
                    yield record
            continue
        try:
            rotated = os.stat(path).st_ino != inode
        except FileNotFoundError:
            rotated = True
        if rotated:
            stream.close()
            stream, partial = None, b""
        time.sleep(POLL_S)
    if stream is not None:
        stream.close()


def _record(line: bytes, shown: dict[tuple[str, str], None]) -> FlowRecord | None:
    try:
        obj: Any = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("recordType")
    key = (str(obj.get("traceId")), str(obj.get("spanId")))
    if kind == "open":
        shown[key] = None
        if len(shown) > _MAX_REMEMBERED:
            del shown[next(iter(shown))]
        return FlowRecord.from_open(obj)
    if kind is None and "traceId" in obj:
        if key in shown:
            del shown[key]
            return None
        return FlowRecord.from_json(obj)
    return None


def line(record: FlowRecord) -> str:
    """One readable line: time, client, destination (SNI, pinned IP), verdict, reason, deciding policy and rule."""
    who = f"{record.namespace}/{record.pod}" if record.namespace else str(record.attributes.get("client.address", "?"))
    via = [f"sni={record.sni}"] if record.sni and record.sni != record.host else []
    if record.peer_address:
        via.append(f"ip={record.peer_address}")
    decided = f"{(record.decision or '-').upper()} {record.reason or '-'}"
    by = f" by {record.policy}" + (f" rule {record.rule}" if record.rule else "") if record.policy else ""
    state = "" if record.closed else " (open)"
    where = f" [{' '.join(via)}]" if via else ""
    text = f"{record.start:%Y-%m-%d %H:%M:%S} {who} -> {record.method} {record.destination}{where} {decided}{by}{state}"
    return printable(text)


def matching(records: Iterator[FlowRecord], flow_filter: FlowFilter) -> Iterator[FlowRecord]:
    wanted = dataclasses.replace(flow_filter, never_closed=False)  # live, every connection starts open
    return (r for r in records if wanted.matches(r))


def run_follow(files: list[str], flow_filter: FlowFilter, output: str) -> int:
    """`audit --follow FILE [filters] [--output json]` until interrupted. Exit 2 without exactly one file."""
    if len(files) != 1 or files[0] == "-":
        print("audit: --follow needs exactly one trail file (the live one)", file=sys.stderr)
        return 2
    try:
        for record in matching(follow_records(Path(files[0])), flow_filter):
            if output == "json":
                row = record.flat()
                row.pop("never_closed", None)
                row["record"] = "close" if record.closed else "open"
                sys.stdout.write(json.dumps(row) + "\n")
            else:
                sys.stdout.write(line(record) + "\n")
            sys.stdout.flush()
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    return 0
