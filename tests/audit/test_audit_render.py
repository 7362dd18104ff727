"""The `audit` command's renderings of values from the wire: control characters never reach the terminal raw, and
array attributes (the ALPN protocols) read as lists."""

from __future__ import annotations

import csv
import io
import json

from egress_gateway.trail.render import write_csv, write_json_lines, write_table

ROW = {
    "egress.host_header": "evil.test\r\n\x1b[2Jfake row",
    "egress.tls_alpn": ["h2", "x\\x01"],
    "egress.message": "line\u2028separator",
}


def test_the_table_escapes_control_characters_and_joins_arrays() -> None:
    out = io.StringIO()
    columns = [("egress.host_header", "HOST"), ("egress.tls_alpn", "ALPN"), ("egress.message", "MESSAGE")]
    write_table([ROW], columns, out, max_cell=None)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the header and one row: no forged line
    assert "evil.test\\r\\n\\x1b[2Jfake row" in lines[1]
    assert "h2, x\\x01" in lines[1]
    assert "line\\u2028separator" in lines[1]
    assert all(c.isprintable() for c in lines[1])


def test_csv_keeps_arrays_as_json_and_json_keeps_them_as_arrays() -> None:
    out = io.StringIO()
    write_csv([ROW], ["egress.tls_alpn"], out)
    (row,) = csv.DictReader(io.StringIO(out.getvalue()))
    assert json.loads(row["egress.tls_alpn"]) == ["h2", "x\\x01"]
    out = io.StringIO()
    write_json_lines([ROW], out)
    assert json.loads(out.getvalue())["egress.tls_alpn"] == ["h2", "x\\x01"]
