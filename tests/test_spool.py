"""The on-disk spool: exact round trips, torn and corrupt tails, one owner at a time."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest

from workers.storage.spool import HEADER, Record, Spool, SpoolError, encode


def rec(i: int, n: int = 3) -> Record:
    return Record("trades", ["token_id", "price", "tx_hash"],
                  [[str(10**77 + i), str(Decimal("0.480") + j), None if j % 2 else f"0x{i}\t\n\\{j}"] for j in range(n)])


def replay(spool: Spool) -> list[Record]:
    out = []
    for seg in spool.sealed():
        out.extend(r for r, _ in spool.read(seg))
    return out


def test_append_then_read_is_exact_and_ordered(tmp_path):
    s = Spool(tmp_path / "w", segment_bytes=400)
    s.open()
    records = [rec(i) for i in range(20)]
    for r in records:
        assert s.append(r) == len(encode(r))
    assert len(s.segments()) > 1  # rolled over to several segments
    s.seal()
    assert replay(s) == records
    nbytes, nseg = s.size()
    assert nbytes == sum(p.stat().st_size for p in s.segments()) and nseg == len(s.segments())
    s.close()


def test_reopen_finds_segments_and_continues_numbering(tmp_path):
    s = Spool(tmp_path / "w")
    s.open()
    s.append(rec(1))
    s.close()
    s2 = Spool(tmp_path / "w")
    s2.open()
    assert [p.name for p in s2.segments()] == ["000000000001.seg"]
    s2.append(rec(2))
    assert [p.name for p in s2.segments()] == ["000000000001.seg", "000000000002.seg"]
    s2.seal()
    assert replay(s2) == [rec(1), rec(2)]
    for seg in s2.sealed():
        s2.remove(seg)
    assert not s2.pending() and not list((tmp_path / "w").glob("*.seg"))
    s2.close()


def test_second_owner_is_refused(tmp_path):
    a = Spool(tmp_path / "w")
    a.open()
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path / "w").open()
    a.close()
    b = Spool(tmp_path / "w")
    b.open()
    b.close()


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 5, -1])
def test_truncated_tail_replays_the_intact_prefix(tmp_path, cut):
    s = Spool(tmp_path / "w")
    s.open()
    good = [rec(i) for i in range(3)]
    for r in good:
        s.append(r)
    last = encode(rec(99))
    s.append(rec(99))
    s.close()
    seg = tmp_path / "w" / "000000000001.seg"
    size = seg.stat().st_size
    keep = size - len(last) + (cut if cut > 0 else len(last) + cut)  # power loss inside the last record
    os.truncate(seg, keep)
    s = Spool(tmp_path / "w")
    s.open()
    assert replay(s) == good
    (c,) = s.corruptions
    assert c.offset == size - len(last) and c.lost_bytes == keep - c.offset
    assert c.saved_to is not None and c.saved_to.read_bytes() == last[: keep - c.offset]
    s.close()


def test_crc_mismatch_stops_at_the_bad_record(tmp_path):
    s = Spool(tmp_path / "w")
    s.open()
    for i in range(3):
        s.append(rec(i))
    s.close()
    seg = tmp_path / "w" / "000000000001.seg"
    data = bytearray(seg.read_bytes())
    second = len(encode(rec(0)))
    data[second + HEADER.size + 10] ^= 0xFF  # flip a byte inside the second record's payload
    seg.write_bytes(bytes(data))
    s = Spool(tmp_path / "w")
    s.open()
    assert replay(s) == [rec(0)]
    assert "CRC" in s.corruptions[0].reason
    s.close()


def test_lone_surrogate_still_spools(tmp_path):
    s = Spool(tmp_path / "w")
    s.open()
    r = Record("markets", ["market_id", "question"], [["1", "bad \udc80 text"]])
    s.append(r)
    s.seal()
    assert replay(s) == [r]
    s.reject("markets", r.columns, r.rows[0], "invalid byte sequence")
    assert "\\udc80" in (tmp_path / "w" / "rejected.jsonl").read_text()
    s.close()


# -- who may write the spool: whatever is in it is replayed into PostgreSQL -------------------------
NOBODY = 65534


def test_own_directory_writable_by_others_is_tightened_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "w"
    directory.mkdir()
    os.chmod(directory, 0o777)
    s = Spool(directory)
    with caplog.at_level("WARNING", logger="workers.storage.spool"):
        s.open()
    s.close()
    assert os.stat(directory).st_mode & 0o777 == 0o755
    assert any(str(directory) in r.getMessage() and "inject" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files of another account")
def test_directory_or_segment_of_another_account_is_refused(tmp_path):
    foreign = tmp_path / "a"
    foreign.mkdir()
    os.chown(foreign, NOBODY, NOBODY)
    with pytest.raises(SpoolError, match="owned by uid 65534"):
        Spool(foreign).open()

    mine = tmp_path / "b"
    mine.mkdir()
    (mine / "000000000001.seg").write_bytes(encode(rec(1)))
    os.chown(mine / "000000000001.seg", NOBODY, NOBODY)
    with pytest.raises(SpoolError, match="000000000001.seg"):
        Spool(mine).open()
    s = Spool(mine)  # refused without keeping the lock: a fixed spool opens
    os.chown(mine / "000000000001.seg", os.geteuid(), os.getegid())
    s.open()
    assert [r for r, _ in s.read(mine / "000000000001.seg")] == [rec(1)]
    s.close()


@pytest.mark.parametrize("payload", [b"[" * 50_000 + b"]" * 50_000, b'{"t":"trades","c":["a"],"r":[["1","2"]]}',
                                     b'{"t":"","c":["a"],"r":[]}', b'{"t":"trades","c":["a","a"],"r":[]}',
                                     b'{"t":"trades","c":["a"],"r":[[true]]}', b'"just a string"'])
def test_record_of_another_shape_is_corruption_after_the_good_ones(tmp_path, payload):
    import zlib
    s = Spool(tmp_path / "w", fsync=False)
    s.open()
    seg = tmp_path / "w" / "000000000001.seg"
    seg.write_bytes(encode(rec(1)) + HEADER.pack(len(payload), zlib.crc32(payload)) + payload + encode(rec(2)))
    got = [r for r, _ in s.read(seg)]
    s.close()
    assert got == [rec(1)]
    assert len(s.corruptions) == 1 and s.corruptions[0].offset == len(encode(rec(1)))
