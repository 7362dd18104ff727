"""The trail's hash chain, written by the real trail writer and checked by `egress-gateway audit verify`: an
untouched trail (rotated, gzip-compressed, appended to by a restarted writer) verifies; deleting, editing,
reordering, inserting or cutting a record makes verify exit 1 naming that record."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import orjson
import pytest

from egress_gateway.audit.chain import GENESIS, Chain
from egress_gateway.audit.jsonl import TrailWriter
from egress_gateway.audit.otlp_json import FinishedRecord
from egress_gateway.cli import main
from egress_gateway.trail.verify import open_line


def _record(n: int, host: str = "pypi.org") -> FinishedRecord:
    return FinishedRecord(
        n + 1, n + 1, "egress CONNECT", 10 + n, 20 + n, {"server.address": host, "n": n}, 0, [], 0, None
    )


def _write(path: Path, count: int, *, first: int = 0, key: bytes | None = None) -> None:
    writer = TrailWriter(path, max_queue_size=1024, envelope={}, hmac_key=key)
    for n in range(first, first + count):
        writer.submit(_record(n))
    writer.shutdown()


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    return code, capsys.readouterr().out


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_every_line_is_sealed_and_linked_and_spans_read_as_before(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    _write(trail, 3)
    sealed = [open_line(line) for line in _lines(trail)]
    assert [s.seq for s in sealed] == [0, 1, 2, 3]
    assert len({s.instance for s in sealed}) == 1
    assert sealed[0].prev == GENESIS
    assert all(after.prev == before.hash for before, after in itertools.pairwise(sealed))
    assert all(s.intact(None) for s in sealed)
    assert sealed[-1].record["recordType"] == "checkpoint" and sealed[-1].record["final"] is True
    assert json.loads(_lines(trail)[0])["attributes"][0] == {
        "key": "server.address",
        "value": {"stringValue": "pypi.org"},
    }


def test_an_untouched_rotated_and_compressed_trail_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trail = tmp_path / "audit.jsonl"
    writer = TrailWriter(trail, max_queue_size=1024, envelope={})
    for n in range(3):
        writer.submit(_record(n))
    writer.force_flush()
    os.rename(trail, tmp_path / "audit.jsonl.2")  # external rotation: the writer reopens the path and chains on
    for n in range(3, 6):
        writer.submit(_record(n))
    writer.force_flush()
    os.rename(trail, tmp_path / "audit.jsonl.1")
    for n in range(6, 8):
        writer.submit(_record(n))
    writer.shutdown()
    with open(tmp_path / "audit.jsonl.2", "rb") as plain, gzip.open(tmp_path / "audit.jsonl.2.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    (tmp_path / "audit.jsonl.2").unlink()
    _write(trail, 2, first=8)  # a restarted gateway: a new instance, linked to the last record of the file

    code, out = _verify(capsys, str(tmp_path))
    assert code == 0, out
    assert "12 sealed record(s) in 3 file(s): intact" in out  # 10 spans + each writer's final checkpoint
    first, second = (open_line(line) for line in _lines(trail)[-3:-1])
    assert second.seq == 1 and first.seq == 0 and first.prev == open_line(_lines(trail)[-4]).hash


def test_the_chain_member_reads_as_orjson_writes_it_whatever_the_instance() -> None:
    # The writer assembles the member from parts it encoded once; the verifier hashes the bytes as written.
    for instance, key in (('gw "1" \\ é \u2028', None), ("gw", b"k" * 32)):
        chain = Chain(instance=instance, key=key, prev="ab" * 32)
        for body in (orjson.dumps({}), orjson.dumps({"a": "é", "n": 1})):
            sealed = open_line(chain.seal(body))
            member = {"instance": instance, "seq": sealed.seq, "prev": sealed.prev, "alg": chain.alg}
            assert sealed.message == orjson.dumps({**orjson.loads(body), "chain": member})[:-2]
            assert sealed.intact(key)
    assert chain.seq == 2


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write(path, 6)
    return path


def test_deleting_a_record_is_reported(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(trail)
    del lines[2]
    trail.write_bytes(b"".join(lines))
    code, out = _verify(capsys, str(trail))
    assert code == 1
    assert f"{trail}:3: instance " in out and "seq 3: gap: seq 2 missing after" in out


def test_editing_a_record_is_reported_even_with_its_hash_recomputed(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _lines(trail)
    lines[1] = lines[1].replace(b"pypi.org", b"pastebin.com")
    trail.write_bytes(b"".join(lines))
    code, out = _verify(capsys, str(trail))
    assert code == 1 and f"{trail}:2: instance " in out and "seq 1: edited" in out

    # Recomputing the edited record's own hash moves the break to the next record's link, which names it.
    from egress_gateway.audit.chain import digest

    sealed = open_line(lines[1])
    lines[1] = sealed.message + b',"hash":"' + digest(sealed.prev, sealed.message, None).encode() + b'"}}\n'
    trail.write_bytes(b"".join(lines))
    code, out = _verify(capsys, str(trail))
    assert code == 1
    assert f"{trail}:3: " in out and f"does not link to the record before it ({trail}:2, seq 1)" in out


def test_reordering_records_is_reported(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(trail)
    lines[2], lines[3] = lines[3], lines[2]
    trail.write_bytes(b"".join(lines))
    code, out = _verify(capsys, str(trail))
    assert code == 1
    assert f"{trail}:4: " in out and "seq 2: out of order" in out


def test_a_record_cut_short_is_reported(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(trail)
    lines[4] = lines[4][:-40] + b"\n"
    trail.write_bytes(b"".join(lines))
    code, out = _verify(capsys, str(trail))
    assert code == 1 and f"{trail}:5: not a sealed record" in out

    # A writer that starts after a crash cut its last line ends that line and links to the last intact record.
    trail.write_bytes(b"".join(_lines(trail)[:4]) + _lines(trail)[4][:-1])
    _write(trail, 1, first=10)
    code, out = _verify(capsys, str(trail))
    assert code == 1 and out.count("not a sealed record") == 1 and f"{trail}:5: not a sealed record" in out
    assert "does not link" not in out and "gap" not in out


def test_an_inserted_record_is_reported(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(trail)
    lines.insert(2, lines[1])  # a replayed copy of a genuine record
    trail.write_bytes(b"".join(lines))
    code, out = _verify(capsys, str(trail))
    assert code == 1 and f"{trail}:3: " in out and "seq 1: out of order" in out


def test_hmac_sealed_trail_needs_the_key_to_verify_and_to_rewrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"s3cret-key\n")
    trail = tmp_path / "audit.jsonl"
    _write(trail, 3, key=b"s3cret-key")
    assert _verify(capsys, str(trail), "--hmac-key-file", str(key_file))[0] == 0
    assert _verify(capsys, str(trail))[0] == 2  # no key: cannot be checked, says so

    # Whoever rewrites the chain without the key produces plain SHA-256 seals, or HMACs under another key.
    lines = _lines(trail)
    rewritten = tmp_path / "rewritten.jsonl"
    _write(rewritten, 3)
    code, out = _verify(capsys, str(rewritten), "--hmac-key-file", str(key_file))
    assert code == 1 and "sealed without the HMAC key" in out
    wrong = tmp_path / "wrong.jsonl"
    _write(wrong, 3, key=b"guessed")
    code, out = _verify(capsys, str(wrong), "--hmac-key-file", str(key_file))
    assert code == 1 and f"{wrong}:1: " in out and "edited" in out
    assert len(lines) == 4


def test_built_in_rotation_keeps_n_gzipped_generations_that_read_and_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from egress_gateway.audit.rotation import Rotation

    trail = tmp_path / "audit.jsonl"
    writer = TrailWriter(trail, max_queue_size=1024, envelope={}, rotation=Rotation(max_bytes=1500, keep=3))
    for n in range(40):
        writer.submit(_record(n))
        if n % 4 == 3:
            writer.force_flush()  # a batch of 4 records (~1 kB): the file rotates every second batch
    writer.shutdown()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1.gz", "audit.jsonl.2.gz", "audit.jsonl.3.gz"]
    with gzip.open(tmp_path / "audit.jsonl.1.gz") as packed:
        assert open_line(packed.readline()).seq > 0

    code, out = _verify(capsys, str(tmp_path))
    assert code == 0, out
    assert "note: " in out and "the trail begins at instance" in out  # the oldest generations were deleted
    assert main(["audit", "--output", "json", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    numbers = [r["n"] for r in rows]
    assert numbers == list(range(numbers[0], 40)) and len(numbers) >= 12  # the newest, in order, none missing


def test_rotation_by_size_with_every_generation_kept_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from egress_gateway.audit.rotation import Rotation

    trail = tmp_path / "audit.jsonl"
    writer = TrailWriter(trail, max_queue_size=1024, envelope={}, rotation=Rotation(max_bytes=1500, keep=100))
    for n in range(30):
        writer.submit(_record(n))
        writer.force_flush()
    writer.shutdown()
    assert len(list(tmp_path.glob("audit.jsonl.*.gz"))) > 5
    code, out = _verify(capsys, str(tmp_path))
    assert code == 0 and "the trail begins" not in out, out
    assert main(["audit", "--output", "json", str(tmp_path)]) == 0
    assert [json.loads(line)["n"] for line in capsys.readouterr().out.splitlines()] == list(range(30))


def test_rotation_by_age_rotates_the_live_file_and_the_trail_reads_and_verifies_across_generations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit.rotate_interval_s` alone (no size limit), through the recorder `run` builds: connections made in three
    waves, each after the live file has grown older than the interval, land in rotated, gzipped generations that
    `audit verify` checks as one chain and `audit` reads, with nothing lost."""
    from egress_gateway.audit import build_recorder
    from egress_gateway.settings import AuditSettings, Settings
    from tests.audit.conftest import allow, facts

    trail = tmp_path / "audit.jsonl"
    settings = AuditSettings(
        file=trail, rotate_bytes=0, rotate_interval_s=1.0, keep_files=50, flush_interval_s=0.05, compress_rotated=True
    )
    recorder = build_recorder(Settings(audit=settings))
    ports = []
    for wave in range(3):
        if wave:
            time.sleep(1.2)  # the live file is now older than rotate_interval_s: the next write rotates it first
        for n in range(3):
            port = 41000 + wave * 10 + n
            record = recorder.open("CONNECT", "127.0.0.2", port)
            record.decided(facts(), allow())
            record.close(bytes_sent=n, bytes_received=n)
            ports.append(port)
        recorder.force_flush()
    recorder.shutdown()

    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "audit.jsonl")
    assert len(rotated) >= 2 and all(name.endswith(".gz") for name in rotated), rotated  # compressed, none half-done
    waves_in_file = []
    for path in tmp_path.iterdir():
        text = (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()).decode()
        waves_in_file.append({port // 10 % 10 for port in ports if f'"intValue":"{port}"' in text})
    assert sorted(wave for waves in waves_in_file for wave in waves) == [0, 1, 2]  # each wave in its own file

    code, out = _verify(capsys, str(tmp_path))
    assert code == 0, out
    assert f"in {len(rotated) + 1} file(s): intact" in out and "the trail begins" not in out
    assert main(["audit", "--output", "json", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["client.port"] for row in rows] == ports  # every connection once, oldest generation first
    assert not any(row.get("never_closed") for row in rows)  # each close line found its open line across files
