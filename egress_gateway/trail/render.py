"""Rendering rows for the `audit` command: an aligned plain-text table, JSON lines, or CSV.

Plain text on purpose (no colours, no terminal-width tricks) so that output pasted in docs or piped to `less` and
`grep` reads the same. Imports nothing from the rest of the package.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

MAX_CELL = 48


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (control characters, line and paragraph separators)
    written as its escape (`\\x01`, `\\u2028`), so a value from the wire cannot move the cursor or forge a row."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _cell(value: Any, max_cell: int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):  # an array attribute (e.g. the ALPN protocols)
        text = ", ".join(printable(str(item)) for item in value)
    else:
        text = printable(str(value))
    return text if max_cell is None or len(text) <= max_cell else text[: max_cell - 1] + "…"


def write_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    out: TextIO,
    *,
    max_cell: int | None = MAX_CELL,
) -> int:
    """`columns` are (key, header); cells longer than `max_cell` are cut with an ellipsis. Returns the row count."""
    cells = [[_cell(row.get(key), max_cell) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return len(cells)


def write_json_lines(rows: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        count += 1
    return count


def write_csv(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None, out: TextIO) -> int:
    """CSV with a header. Without `columns`, the union of keys in first-seen order (rows are buffered)."""
    materialized = list(rows)
    if columns is None:
        seen: dict[str, None] = {}
        for row in materialized:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in materialized:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return len(materialized)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple):  # an array attribute: as a JSON array, so items with commas stay apart
        return json.dumps(list(value), ensure_ascii=False)
    return value
