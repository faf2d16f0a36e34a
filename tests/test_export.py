"""`collectord export` against the real PostgreSQL, read back by DuckDB, polars and pandas.

Rows go in through the project's Writer (and plain SQL for what the Writer would
refuse or for bulk), the export runs as the real CLI in a subprocess, and every
value read back is compared with what PostgreSQL holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import struct
import sys
import termios
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import psycopg2
import pytest

from collectord.cli import EXPORT_TABLES
from tests.conftest import ROOT
from tests.conftest import query as fetch
from workers.storage import Writer, migrate
from workers.storage.export import EXPORTS

UTC = timezone.utc
PASSWORD = "hunter2-secret"
TOKEN_A = "1" + "0" * 76 + "7"  # 78 digits: beyond int64 and float64
TOKEN_B = "71321045679252212594626385532706912750332728571942532289631379312455583992563"
D1 = datetime(2026, 11, 28, tzinfo=UTC)
DAYS = ("2026-11-28", "2026-11-29", "2026-11-30")


@pytest.fixture
def db(pg_dsn):
    migrate(pg_dsn)
    return pg_dsn


@pytest.fixture
def conf(tmp_path, db):
    # trust auth ignores the password: the DSN works and still carries one to hide
    path = tmp_path / "collectord.conf"
    path.write_text(f"[collectord]\ndsn = {db} password={PASSWORD}\ndata_dir = {tmp_path / 'data'}\n")
    return path


def cli(conf: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "collectord", "-c", str(conf), "export", *args],
                       capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert PASSWORD not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def execute(dsn: str, sql: str) -> None:
    """One statement, committed (conftest's query() only reads)."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def write(dsn: str, tmp_path: Path, table: str, rows: list[dict]) -> None:
    w = Writer(dsn, tmp_path / "spool", name="test", background=False, max_rows=10**6, max_age=60).open()
    try:
        w.add(table, rows)
        w.flush()
    finally:
        w.close()


def trade(token, ts, price, size, side="BUY", tx="0xabc", ordinal=0, source="ws", fee=None):
    return {"token_id": token, "condition_id": "0xcond", "ts": ts, "price": Decimal(price), "size": Decimal(size),
            "side": side, "tx_hash": tx, "ordinal": ordinal, "fee_rate_bps": fee, "source": source,
            "received_at": ts + timedelta(milliseconds=250)}


def fill(dsn: str, tmp_path: Path) -> None:
    """A few rows of every table, on edges: day boundaries, ms, 78-digit ids, NULLs, tiny and big values."""
    write(dsn, tmp_path, "trades", [
        trade(TOKEN_A, D1 + timedelta(hours=1, milliseconds=123), "0.48", "10"),
        trade(TOKEN_A, D1 + timedelta(hours=1, milliseconds=123), "0.48", "10", ordinal=1),  # exact repeat
        trade(TOKEN_B, D1 + timedelta(days=1) - timedelta(milliseconds=1), "0.0001", "0.000001", side="SELL"),
        trade(TOKEN_B, D1 + timedelta(days=1), "0.999", "123456789012.123456", tx="0xdef", fee=Decimal("1.5")),
        trade(TOKEN_A, D1 + timedelta(days=1, hours=5, seconds=7), "0.5", "3.25", tx=None, source="backfill"),
        trade(TOKEN_A, D1 + timedelta(days=2, hours=23, minutes=59, seconds=59, microseconds=999999), "1", "2",
              tx="0x99"),
    ])
    write(dsn, tmp_path, "price_snapshots", [
        {"token_id": TOKEN_A, "ts": D1 + timedelta(minutes=1, milliseconds=7), "condition_id": "0xcond",
         "best_bid": Decimal("0.47"), "best_ask": Decimal("0.49"), "mid": Decimal("0.48005"),
         "last_trade_price": Decimal("0.48"), "received_at": D1 + timedelta(minutes=1, seconds=1)},
        {"token_id": TOKEN_B, "ts": D1 + timedelta(days=2), "condition_id": "0xcond", "best_bid": None,
         "best_ask": Decimal("0.01"), "mid": None, "last_trade_price": None, "received_at": None},
    ])
    levels = [[f"0.{i:02d}", f"{i * 100}.{i:06d}"] for i in range(48, 0, -1)]
    write(dsn, tmp_path, "orderbook_snapshots", [
        {"token_id": TOKEN_A, "condition_id": "0xcond", "ts": D1 + timedelta(hours=2, milliseconds=500),
         "hash": "h1", "best_bid": Decimal("0.48"), "best_ask": None, "spread": None,
         "bid_depth": Decimal("1234.5"), "ask_depth": Decimal("0"), "bid_levels": 48, "ask_levels": 0,
         "bids": levels, "asks": [], "received_at": D1 + timedelta(hours=2, seconds=1)},
        {"token_id": TOKEN_B, "condition_id": "0xcond", "ts": D1 + timedelta(days=1, hours=3), "hash": "",
         "best_bid": None, "best_ask": Decimal("0.52"), "spread": None, "bid_depth": None, "ask_depth": None,
         "bid_levels": None, "ask_levels": None, "bids": None, "asks": [["0.52", "7"], ["0.6", "0.000001"]],
         "received_at": None},
    ])
    write(dsn, tmp_path, "feed_gaps", [
        {"token_id": TOKEN_A, "started_at": D1 + timedelta(hours=4, milliseconds=1),
         "ended_at": D1 + timedelta(hours=4, seconds=3), "reason": "disconnect", "recovered_at": None,
         "recovered_trades": None, "shard": "trades.0", "condition_id": "0xcond", "unrecoverable": None},
        {"token_id": TOKEN_B, "started_at": D1 + timedelta(days=1, hours=4), "ended_at": None, "reason": "start",
         "recovered_at": D1 + timedelta(days=1, hours=5), "recovered_trades": 12, "shard": "trades.1",
         "condition_id": "0xcond", "unrecoverable": None},
    ])
    write(dsn, tmp_path, "markets", [
        {"market_id": "559651", "condition_id": "0xcond", "slug": "will-it", "question": "Will it?",
         "active": True, "closed": False, "end_date": D1 + timedelta(days=30), "volume": Decimal("429835.4779950002"),
         "volume_24h": Decimal("0"), "liquidity": None, "outcomes": ["Yes", "No"], "tags": None,
         "updated_at": D1, "raw": {"id": "559651", "volume": "429835.4779950002"}},
    ])
    write(dsn, tmp_path, "tokens", [
        {"token_id": TOKEN_A, "market_id": "559651", "condition_id": "0xcond", "outcome": "Yes", "outcome_index": 0},
        {"token_id": TOKEN_B, "market_id": "559651", "condition_id": "0xcond", "outcome": "No", "outcome_index": 1},
    ])
    write(dsn, tmp_path, "resolutions", [
        {"market_id": "559651", "condition_id": "0xcond", "winning_token_id": TOKEN_A, "winning_outcome": "Yes",
         "payouts": [Decimal("1"), Decimal("0")], "status": "resolved", "resolved_at": D1 + timedelta(days=2)},
    ])


def expected(dsn: str, table: str) -> list[dict]:
    """The table's rows as PostgreSQL returns them, in the export's order, in the export's terms:
    jsonb book sides as lists of {price, size} Decimals, other jsonb as parsed JSON."""
    export = EXPORTS[table]
    names = [c.name for c in export.columns]
    rows = fetch(dsn, f"SELECT {', '.join(names)} FROM {table} ORDER BY {', '.join(export.order)}")
    out = []
    for row in rows:
        item = dict(zip(names, row))
        for c in export.columns:
            v = item[c.name]
            if c.kind == "book" and v is not None:
                item[c.name] = [{"price": Decimal(p), "size": Decimal(s)} for p, s in v]
            elif c.kind == "decimals" and v is not None:
                item[c.name] = [Decimal(str(x)) for x in v]
        out.append(item)
    return out


def normalized(table: str, rows: list[dict]) -> list[dict]:
    """A reader's rows in the same terms as expected(): JSON text parsed, numpy/pandas scalars to Python."""
    export = EXPORTS[table]
    out = []
    for row in rows:
        item = {}
        for c in export.columns:
            v = row[c.name]
            if v is not None and not isinstance(v, (str, list, dict)) and pd.isna(v) is True:
                v = None
            if c.kind == "json" and v is not None:
                v = json.loads(v)
            elif c.kind == "time" and v is not None:
                v = v.to_pydatetime() if hasattr(v, "to_pydatetime") else v
                assert v.utcoffset() == timedelta(0), (table, c.name, v)
            elif c.kind in ("book", "decimals") and v is not None:
                v = [dict(x) if c.kind == "book" else x for x in list(v)]
            elif c.kind in ("int", "bigint") and v is not None:
                v = int(v)
            elif c.kind == "bool" and v is not None:
                v = bool(v)
            item[c.name] = v
        out.append(item)
    return out


def assert_same(table: str, got: list[dict], want: list[dict], reader: str) -> None:
    assert len(got) == len(want), (reader, table)
    for g, w in zip(got, want):
        for name in w:
            a, b = g[name], w[name]
            assert a == b, (reader, table, name, a, b)
            if isinstance(b, str):
                assert type(a) is str, (reader, table, name, type(a))  # ids stay strings
            if isinstance(b, Decimal):
                assert isinstance(a, Decimal), (reader, table, name, type(a))  # exact, not float


def read_duckdb(pattern: str) -> list[dict]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    cur = con.execute(f"SELECT * FROM read_parquet('{pattern}')")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def read_polars(pattern: str) -> list[dict]:
    return pl.scan_parquet(pattern).collect().to_dicts()


def read_pandas(directory: Path) -> list[dict]:
    return pd.read_parquet(directory).to_dict("records")


def test_every_table_round_trips_exactly_through_duckdb_polars_and_pandas(db, conf, tmp_path):
    fill(db, tmp_path)
    out = tmp_path / "out"
    r = cli(conf, "all", "--since", DAYS[0], "--until", "2026-12-01", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not a terminal: no bar, and nothing to warn about
    assert r.stdout.splitlines()[-1].startswith("export done in ")
    for table, export in EXPORTS.items():
        files = sorted(p.name for p in (out / table).iterdir())
        if export.time:
            days = sorted({str(row[export.time].astimezone(UTC).date()) for row in expected(db, table)})
            assert files == [f"{table}-{d}.parquet" for d in days], table
        else:
            assert files == [f"{table}.parquet"], table
        # one declared schema, exactly, in every file
        for name in files:
            schema = pq.read_schema(out / table / name)
            assert schema.remove_metadata().equals(export.schema()), (table, name)
        want = expected(db, table)
        assert want, table
        pattern = str(out / table / "*.parquet")
        assert_same(table, normalized(table, read_duckdb(pattern)), want, "duckdb")
        assert_same(table, normalized(table, read_polars(pattern)), want, "polars")
        assert_same(table, normalized(table, read_pandas(out / table)), want, "pandas")

    trades = pq.read_table(out / "trades")
    assert trades.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert trades.schema.field("price").type == pa.decimal128(18, 8)
    assert trades.schema.field("token_id").type == pa.string()
    # the day boundary: 23:59:59.999 stays on the 28th, midnight opens the 29th; ms kept
    first = pq.read_table(out / "trades" / "trades-2026-11-28.parquet").column("ts").to_pylist()
    assert first[-1] == datetime(2026, 11, 28, 23, 59, 59, 999000, tzinfo=UTC)
    assert first[0].microsecond == 123000
    second = pq.read_table(out / "trades" / "trades-2026-11-29.parquet").column("ts").to_pylist()
    assert second[0] == datetime(2026, 11, 29, tzinfo=UTC)
    # DuckDB computes on the decimals as they are: price * size is exact
    notional = duckdb.connect().execute(f"SELECT sum(price * size) FROM read_parquet('{out}/trades/*.parquet')").fetchone()[0]
    assert notional == sum(Decimal(p) * Decimal(s) for p, s in fetch(db, "SELECT price, size FROM trades"))
    assert not [p for p in out.rglob(".*") if p.name != ".collectord-export.lock"]  # no temp file left


def test_a_rerun_skips_unchanged_days_and_redoes_deleted_changed_and_open_ones(db, conf, tmp_path):
    fill(db, tmp_path)
    out = tmp_path / "out"
    args = ("--since", DAYS[0], "--until", "2026-12-01", "--out", str(out))
    assert cli(conf, "trades", *args).returncode == 0
    paths = {d: out / "trades" / f"trades-{d}.parquet" for d in DAYS}
    stamps = {d: p.stat().st_mtime_ns for d, p in paths.items()}

    r = cli(conf, "trades", *args)
    assert r.returncode == 0, r.stderr
    assert [line.split(": ", 1)[1].split(" (")[0] for line in r.stdout.splitlines()[:3]] == [
        "unchanged since the last export"] * 3
    assert {d: p.stat().st_mtime_ns for d, p in paths.items()} == stamps

    paths[DAYS[1]].unlink()  # a deleted day is redone
    write(db, tmp_path, "trades", [trade(TOKEN_B, D1 + timedelta(hours=6), "0.3", "1", tx="0xlate",
                                         source="backfill")])  # a late row on the first day
    r = cli(conf, "trades", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"trades {DAYS[0]}: 4 rows written")
    assert lines[1].startswith(f"trades {DAYS[1]}: 2 rows written")
    assert lines[2].startswith(f"trades {DAYS[2]}: unchanged")
    assert paths[DAYS[2]].stat().st_mtime_ns == stamps[DAYS[2]]
    assert "0xlate" in pq.read_table(paths[DAYS[0]]).column("tx_hash").to_pylist()

    # feed_gaps rows change in place: a recovery redoes its day
    assert cli(conf, "feed_gaps", *args).returncode == 0
    execute(db, "UPDATE feed_gaps SET recovered_at = started_at + interval '1 minute', recovered_trades = 3 "
                "WHERE recovered_at IS NULL")
    r = cli(conf, "feed_gaps", *args)
    assert [line.split(": ")[1].split(" ")[1] for line in r.stdout.splitlines()[:2]] == ["rows", "since"]
    assert pq.read_table(out / "feed_gaps").column("recovered_trades").to_pylist() == [3, 12]

    # a whole table: redone when a row is updated, skipped otherwise
    assert "unchanged" in cli(conf, "resolutions", "--out", str(out)).stdout
    execute(db, "UPDATE resolutions SET status = 'void'")
    assert "1 rows written" in cli(conf, "resolutions", "--out", str(out)).stdout

    # --force rewrites everything
    r = cli(conf, "trades", *args, "--force")
    assert [" rows written " in line for line in r.stdout.splitlines()[:3]] == [True] * 3

    # a day cut by --since is another file's worth: redone, and only that part is in it
    r = cli(conf, "trades", "--since", "2026-11-29T03:00", "--until", "2026-11-30", "--out", str(out))
    assert r.stdout.splitlines()[0].startswith(f"trades {DAYS[1]}: 1 rows written"), r.stdout
    assert pq.read_table(paths[DAYS[1]]).num_rows == 1

    # the open day (--until defaults to now) is exported again on every run
    now = datetime.now(UTC)
    write(db, tmp_path, "trades", [trade(TOKEN_A, now - timedelta(seconds=1), "0.2", "1", tx="0xnow")])
    since = now.date().isoformat()
    assert " 1 rows written " in cli(conf, "trades", "--since", since, "--out", str(out)).stdout
    assert " 1 rows written " in cli(conf, "trades", "--since", since, "--out", str(out)).stdout


def _partitions(dsn: str, table: str, *days: str) -> None:
    """The day partitions raw INSERTs need (the Writer and the collectors make their own)."""
    from datetime import date

    from workers.storage import partitions

    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        partitions.create(conn, table, [date.fromisoformat(d) for d in days])
    finally:
        conn.close()


def _bulk_trades(dsn: str, n: int) -> None:
    _partitions(dsn, "trades", "2026-11-28", "2026-11-29", "2026-11-30")
    execute(dsn, f"""INSERT INTO trades (token_id, condition_id, ts, price, size, side, tx_hash, ordinal, source,
                                         trade_day)
        SELECT '{TOKEN_A}', '0xcond', ts, 0.001 * (i % 999 + 1), i % 1000 + 0.000001, 'BUY', '0x' || i, 0, 'ws',
               (ts AT TIME ZONE 'UTC')::date
        FROM generate_series(1, {n}) i,
             LATERAL (SELECT timestamptz '2026-11-28 00:00:00+00' + i * interval '1 millisecond' * 100) AS t(ts)""")


def _export_until_temp(conf: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(conf), "export", "trades",
                             "--since", DAYS[0], "--until", DAYS[1], "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        temps = list((out / "trades").glob(".trades-*.tmp-*")) if (out / "trades").is_dir() else []
        if temps:
            return proc, temps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the export never started its file")


def test_an_interrupted_export_leaves_no_partial_file_and_a_rerun_completes(db, conf, tmp_path):
    _bulk_trades(db, 150_000)
    out = tmp_path / "out"
    final = out / "trades" / f"trades-{DAYS[0]}.parquet"

    proc, temp = _export_until_temp(conf, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, (stdout, stderr)
    assert stderr.strip().splitlines() == ["collectord: export interrupted (SIGTERM); no partial file is left "
                                           "under a final name"]
    assert not final.exists() and not temp.exists()

    proc, temp = _export_until_temp(conf, out)
    proc.kill()  # SIGKILL: no cleanup can run; the hidden temp file is all that is left
    proc.communicate(timeout=30)
    assert not final.exists()
    assert list(out.glob("trades/*.parquet")) == []  # no reader's glob sees the leftover

    r = cli(conf, "trades", "--since", DAYS[0], "--until", DAYS[1], "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert not temp.exists()
    assert pq.read_metadata(final).num_rows == 150_000
    assert pq.read_metadata(final).num_row_groups == 2  # streamed in row groups of EXPORTS' size
    got = duckdb.connect().execute(f"SELECT count(*), sum(size), min(ts) FROM read_parquet('{final}')").fetchone()
    want = fetch(db, "SELECT count(*), sum(size), min(ts) FROM trades")[0]
    assert got == want


def test_a_value_that_does_not_fit_stops_the_export_naming_the_row(db, conf, tmp_path):
    fill(db, tmp_path)
    _partitions(db, "trades", "2026-11-29")
    execute(db, f"INSERT INTO trades (token_id, ts, price, size, side, tx_hash, source, trade_day) VALUES "
                f"('{TOKEN_B}', '2026-11-29 10:00:00.5+00', 0.123456789, 1, 'BUY', '0xwide', 'ws', '2026-11-29')")
    out = tmp_path / "out"
    r = cli(conf, "trades", "--since", DAYS[0], "--until", "2026-12-01", "--out", str(out))
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert f"token_id={TOKEN_B}" in line and "ts=2026-11-29T10:00:00.500000+00:00" in line and "0xwide" in line
    assert "price = '0.123456789' does not fit decimal(18,8)" in line and "nothing was rounded" in line
    assert (out / "trades" / f"trades-{DAYS[0]}.parquet").exists()  # the day before is complete
    assert sorted(p.name for p in (out / "trades").iterdir()) == [f"trades-{DAYS[0]}.parquet"]

    execute(db, "UPDATE trades SET price = 0.1, size = 'NaN' WHERE tx_hash = '0xwide'")
    r = cli(conf, "trades", "--since", DAYS[1], "--until", DAYS[2], "--out", str(out))
    assert r.returncode == 1 and "size = 'NaN' does not fit decimal(24,6)" in r.stderr

    # inside a book side: the level's own row is named (not the batch's first)
    _partitions(db, "orderbook_snapshots", "2026-11-30")
    execute(db, """INSERT INTO orderbook_snapshots (token_id, ts, hash, bids, asks) VALUES
        ('111', '2026-11-30 01:00+00', 'a', '[]', '[["0.5", "1"]]'),
        ('222', '2026-11-30 02:00+00', 'b', '[["0.4", "2"], ["0.3", "0.0000001"]]', NULL)""")
    r = cli(conf, "orderbook_snapshots", "--since", DAYS[2], "--until", "2026-12-01", "--out", str(out))
    assert r.returncode == 1
    assert ("orderbook_snapshots row token_id=222, ts=2026-11-30T02:00:00+00:00, hash=b: bids size = '0.0000001' "
            "does not fit decimal(24,6)") in r.stderr, r.stderr


@pytest.mark.parametrize("args, code, words", [
    (("trades", "--since", "yesterday", "--out", "X"), 2, "--since 'yesterday' is not an ISO date or time"),
    (("trades", "--since", "2026-11-31", "--out", "X"), 2, "--since '2026-11-31' is not an ISO date or time"),
    (("trades", "--since", "2026-12-02", "--until", "2026-12-01", "--out", "X"), 2, "is not before --until"),
    (("fills", "--since", "2026-12-01", "--out", "X"), 2, "unknown table 'fills' (one of: trades, "),
    (("trades", "--since", "2026-12-01"), 2, "--out DIR is required"),
    (("trades", "--out", "X"), 2, "--since is required for trades"),
])
def test_bad_arguments_say_so_in_one_line(conf, tmp_path, args, code, words):
    r = cli(conf, *args)
    assert r.returncode == code
    (line,) = r.stderr.splitlines()
    assert line.startswith("collectord: export: ") and words in line, line
    assert not (tmp_path / "X").exists()


def test_unreachable_database_and_bad_config(tmp_path):
    conf = tmp_path / "down.conf"
    conf.write_text(f"[collectord]\ndsn = host=127.0.0.1 port=1 dbname=x user=u password={PASSWORD}\n")
    r = cli(conf, "trades", "--since", "2026-12-01", "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()
    assert line.startswith("collectord: export: database (host=127.0.0.1 port=1 dbname=x user=u password=***)")

    conf.write_text("[collectord]\ngraceful_timeout = soon\n")
    r = cli(conf, "trades", "--since", "2026-12-01", "--out", str(tmp_path / "o"))
    assert r.returncode == 78 and len(r.stderr.splitlines()) == 1 and "graceful_timeout" in r.stderr


def test_a_missing_table_is_one_line(pg_dsn, tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text(f"[collectord]\ndsn = {pg_dsn}\n")  # an empty schema: never migrated
    r = cli(conf, "markets", "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert r.stderr.strip() == ("collectord: export: table markets does not exist in this database "
                                "(run `collectord db upgrade`, or check the dsn's schema)")


def test_a_terminal_gets_a_progress_bar(db, conf, tmp_path):
    _bulk_trades(db, 30_000)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 wide
    proc = subprocess.Popen([sys.executable, "-m", "collectord", "-c", str(conf), "export", "trades",
                             "--since", DAYS[0], "--until", DAYS[1], "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=slave, text=True, cwd=str(ROOT))
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert b"trades 2026-11-28" in seen and b"rows/s" in seen and b"30.0k" in seen, seen[-400:]
    assert stdout.splitlines()[0].startswith("trades 2026-11-28: 30,000 rows written")


def test_the_parser_names_every_exported_table_and_stays_stdlib_only():
    assert set(EXPORT_TABLES) == set(EXPORTS)
    code = ("import sys, collectord.cli as c; c.build_parser().parse_args(['export', 'trades']); "
            "bad = [m for m in ('pyarrow', 'psycopg2', 'tqdm', 'workers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr


def test_two_exports_never_share_a_directory(db, conf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".collectord-export.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running export holds it
        r = cli(conf, "tokens", "--out", str(out))
        assert r.returncode == 1
        assert r.stderr.strip() == f"collectord: export: another collectord export is writing into {out}"
    finally:
        os.close(fd)
    assert cli(conf, "tokens", "--out", str(out)).returncode == 0
