"""Export: tables -> Parquet files for research (pandas, polars, DuckDB read them as they are).

Every exported table, its time column and its Arrow schema are declared once,
in EXPORTS below. Layout under the output directory:

    OUT/TABLE/TABLE-YYYY-MM-DD.parquet   one file per UTC day of the time column
                                          (trades, price_snapshots, orderbook_snapshots,
                                          feed_gaps)
    OUT/TABLE/TABLE.parquet              the whole table (markets, tokens, resolutions:
                                          current state, rewritten in place by upserts)

so `read_parquet('OUT/trades/*.parquet')` (DuckDB), `pl.scan_parquet('OUT/trades/*.parquet')`
and `pd.read_parquet('OUT/trades')` read a table whole. Files in the making are
hidden (`.TABLE-DAY.parquet.tmp-PID`): no glob and no dataset reader sees them.

Types: numeric -> decimal128 with a scale that is exact for the exchange's values,
every value checked by Arrow's cast (a value with more digits, NaN or Infinity
stops the export with ExportValueError naming the row: nothing is rounded);
text ids -> string; timestamptz -> timestamp[us, UTC] (PostgreSQL's own precision,
so WebSocket milliseconds stay); book sides -> list<struct<price, size>>, best
level first; other jsonb -> its JSON text.

Resumable: a day's file is written under its hidden name and renamed when
complete. Its footer records the range exported and a fingerprint of the source
(per table: the row count for the insert-only tables, a hash of every row for
feed_gaps, whose rows are updated when recovered), read in the same snapshot
as the rows. A re-run skips a day whose file records the same range, schema and
fingerprint; today's file, a day cut differently by --since/--until, a day that
received a late trade (backfill) or whose gaps were recovered since is exported again.

Streaming in bounded memory: one server-side cursor per day, FETCH of a fixed
number of rows, converted to Arrow and written as row groups of a fixed number of
rows, so memory does not depend on the table's size.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import hashlib
import json
import os
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import psycopg2
import psycopg2.extensions
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import CollectorError

from .db import connect

FORMAT = 1  # bump when the files' layout or metadata change: every file is redone
META_KEY = b"collectord.export"
STATEMENT_TIMEOUT = 900.0  # s per statement: the first FETCH of a busy day sorts the whole day
CONNECT_TIMEOUT = 10
UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)


class ExportError(CollectorError):
    """The export cannot go on; the message says why in one line (exit_code 1)."""


class ExportValueError(ExportError):
    """A value does not fit its declared Arrow type exactly (it would be rounded)."""


# -- column kinds ------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One exported column: its name (the table's), its Arrow type, and how it is selected.

    kind: text | bool | int | bigint | time | decimal | json | book | decimals
      time:     epoch microseconds (bigint) from PostgreSQL -> timestamp[us, UTC]
      decimal:  numeric as text -> decimal128(precision, scale), checked by Arrow's cast
      json:     jsonb as its text
      book:     jsonb [[price, size], ...] -> list<struct<price decimal, size decimal>>
      decimals: jsonb [x, ...] -> list<decimal>
    """

    name: str
    kind: str
    precision: int = 0
    scale: int = 0
    size_precision: int = 0  # book: the size's type (the price's is precision, scale)
    size_scale: int = 0

    def arrow_type(self) -> pa.DataType:
        if self.kind == "text" or self.kind == "json":
            return pa.string()
        if self.kind == "bool":
            return pa.bool_()
        if self.kind == "int":
            return pa.int32()
        if self.kind == "bigint":
            return pa.int64()
        if self.kind == "time":
            return pa.timestamp("us", tz="UTC")
        if self.kind == "decimal":
            return pa.decimal128(self.precision, self.scale)
        if self.kind == "decimals":
            return pa.list_(pa.decimal128(self.precision, self.scale))
        if self.kind == "book":
            return pa.list_(pa.struct([
                pa.field("price", pa.decimal128(self.precision, self.scale)),
                pa.field("size", pa.decimal128(self.size_precision, self.size_scale)),
            ]))
        raise ValueError(f"unknown column kind {self.kind!r}")

    def select(self) -> list[str]:
        """The SQL expressions this column is read through (two for a book side)."""
        c = self.name
        if self.kind == "time":
            return [f"(extract(epoch FROM {c}) * 1000000)::bigint"]
        if self.kind in ("decimal", "json"):
            return [f"{c}::text"]
        if self.kind == "decimals":
            return [f"CASE WHEN {c} IS NULL THEN NULL ELSE ARRAY(SELECT e #>> '{{}}' FROM "
                    f"jsonb_array_elements({c}) WITH ORDINALITY x(e, n) ORDER BY n) END"]
        if self.kind == "book":
            return [f"CASE WHEN {c} IS NULL THEN NULL ELSE ARRAY(SELECT e ->> {i} FROM "
                    f"jsonb_array_elements({c}) WITH ORDINALITY x(e, n) ORDER BY n) END" for i in (0, 1)]
        return [c]


# Scales exact for what the exchange sends, with room above it; Arrow's checked cast
# fails the export (naming the row) on anything wider, never rounds it.
PRICE = (18, 8)  # probabilities in [0, 1] on ticks down to 0.0001 (a midpoint: 0.00005)
SIZE = (24, 6)  # share and USDC amounts: 6 decimals on chain; 18 integer digits


def _price(name: str) -> Column:
    return Column(name, "decimal", *PRICE)


def _size(name: str) -> Column:
    return Column(name, "decimal", *SIZE)


def _amount(name: str) -> Column:
    """Gamma's volumes and liquidity (floats printed with up to 17 digits): 18 places."""
    return Column(name, "decimal", 38, 18)


def _text(name: str) -> Column:
    return Column(name, "text")


def _time(name: str) -> Column:
    return Column(name, "time")


def _book(name: str) -> Column:
    return Column(name, "book", *PRICE, size_precision=SIZE[0], size_scale=SIZE[1])


@dataclass(frozen=True)
class Export:
    """One exportable table.

    time: the column that splits it into UTC days (None: exported whole, one file).
    order: the ORDER BY inside a file (time first, then the natural key: deterministic files).
    key: the columns that name a row in an error message.
    fingerprint: SQL aggregates over a day's rows that change whenever the day's rows do.
    fetch_rows / group_rows: rows per FETCH and per Parquet row group (memory bound).
    """

    name: str
    columns: tuple[Column, ...]
    time: str | None
    order: tuple[str, ...]
    key: tuple[str, ...]
    fingerprint: str = "count(*)"
    fetch_rows: int = 20_000
    group_rows: int = 100_000

    def schema(self, metadata: dict | None = None) -> pa.Schema:
        fields = [pa.field(c.name, c.arrow_type()) for c in self.columns]
        meta = {META_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata else None
        return pa.schema(fields, metadata=meta)

    def schema_id(self) -> str:
        """Short hash of the Arrow schema: a file of another schema is redone."""
        return hashlib.sha256(self.schema().to_string().encode()).hexdigest()[:16]

    def select_sql(self) -> str:
        exprs = ", ".join(e for c in self.columns for e in c.select())
        where = f" WHERE {self.time} >= %(lo)s AND {self.time} < %(hi)s" if self.time else ""
        return f"SELECT {exprs} FROM {self.name}{where} ORDER BY {', '.join(self.order)}"

    def fingerprint_sql(self) -> str:
        where = f" WHERE {self.time} >= %(lo)s AND {self.time} < %(hi)s" if self.time else ""
        return f"SELECT count(*), {self.fingerprint} FROM {self.name} t{where}"

    def filename(self, day: dt.date | None) -> str:
        return f"{self.name}-{day.isoformat()}.parquet" if day else f"{self.name}.parquet"


# Rows of feed_gaps change after they were written (ended, recovered), and markets, tokens
# and resolutions are upserted in place: their fingerprint hashes every row, so any change
# redoes the file (the hash is computed by the server, far cheaper than the export).
_ROW_HASH = "coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text"

EXPORTS: dict[str, Export] = {e.name: e for e in (
    Export(
        "trades",
        (_text("token_id"), _text("condition_id"), _time("ts"), _price("price"), _size("size"),
         _text("side"), _text("tx_hash"), Column("ordinal", "int"), Column("fee_rate_bps", "decimal", 18, 6),
         _text("source"), _time("received_at")),
        time="ts", order=("ts", "token_id", "tx_hash", "price", "size", "side", "ordinal"),
        key=("token_id", "ts", "tx_hash", "ordinal"),
    ),
    Export(
        "price_snapshots",
        (_text("token_id"), _time("ts"), _text("condition_id"), _price("best_bid"), _price("best_ask"),
         _price("mid"), _price("last_trade_price"), _time("received_at")),
        time="ts", order=("ts", "token_id"), key=("token_id", "ts"),
    ),
    Export(
        "orderbook_snapshots",
        (_text("token_id"), _text("condition_id"), _time("ts"), _text("hash"), _price("best_bid"),
         _price("best_ask"), _price("spread"), _size("bid_depth"), _size("ask_depth"),
         Column("bid_levels", "int"), Column("ask_levels", "int"), _book("bids"), _book("asks"),
         _time("received_at")),
        time="ts", order=("ts", "token_id", "hash"), key=("token_id", "ts", "hash"),
        fetch_rows=2_000, group_rows=20_000,  # a book row holds hundreds of levels
    ),
    Export(
        "feed_gaps",
        (Column("id", "bigint"), _text("token_id"), _text("condition_id"), _time("started_at"),
         _time("ended_at"), _text("reason"), _time("recovered_at"), Column("recovered_trades", "int"),
         _text("unrecoverable"), _text("shard")),
        time="started_at", order=("started_at", "token_id"), key=("token_id", "started_at"),
        fingerprint=_ROW_HASH,
    ),
    Export(
        "resolutions",
        (_text("market_id"), _text("condition_id"), _text("winning_token_id"), _text("winning_outcome"),
         Column("payouts", "decimals", 38, 18), _text("status"), _time("resolved_at"), _time("updated_at"),
         _time("first_seen_at")),
        time=None, order=("market_id",), key=("market_id",), fingerprint=_ROW_HASH,
    ),
    Export(
        "markets",
        (_text("market_id"), _text("condition_id"), _text("question_id"), _text("slug"), _text("question"),
         _text("event_id"), _text("neg_risk_market_id"), Column("active", "bool"), Column("closed", "bool"),
         Column("archived", "bool"), Column("neg_risk", "bool"), _time("start_date"), _time("end_date"),
         _time("closed_time"), _amount("volume"), _amount("volume_24h"), _amount("liquidity"),
         Column("outcomes", "json"), Column("tags", "json"), _text("uma_resolution_status"),
         _time("created_at"), _time("updated_at"), Column("raw", "json"), _time("first_seen_at"),
         _time("last_seen_at")),
        time=None, order=("market_id",), key=("market_id",), fingerprint=_ROW_HASH,
        fetch_rows=5_000, group_rows=20_000,
    ),
    Export(
        "tokens",
        (_text("token_id"), _text("market_id"), _text("condition_id"), _text("outcome"),
         Column("outcome_index", "int")),
        time=None, order=("token_id",), key=("token_id",), fingerprint=_ROW_HASH,
    ),
)}


# -- rows -> Arrow -----------------------------------------------------------------


def _checked_decimals(values: Sequence, typ: pa.DataType, export: Export, column: str,
                      rows: Sequence[tuple], index_of) -> pa.Array:
    """Decimal text -> decimal128 through Arrow's checked cast; on failure, find the row."""
    try:
        return pa.array(values, pa.string()).cast(typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    for i, value in enumerate(values):
        try:
            pa.array([value], pa.string()).cast(typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise ExportValueError(
                f"{export.name} row {_row_name(export, rows[index_of(i)])}: {column} = {value!r} does not fit "
                f"decimal({typ.precision},{typ.scale}) exactly (more than {typ.scale} decimal places, "
                f"{typ.precision - typ.scale} integer digits, or not a finite number); nothing was rounded "
                f"and no file was written for it") from None
    raise ExportValueError(f"{export.name}: {column}: a value does not convert to decimal "
                           f"({typ.precision},{typ.scale})")  # every value alone converts: not expected


def _row_name(export: Export, row: tuple) -> str:
    """key=value, ... of a fetched row (times shown as ISO UTC)."""
    position, parts = 0, []
    for c in export.columns:
        width = len(c.select())
        if c.name in export.key:
            value = row[position]
            if c.kind == "time" and value is not None:
                value = (dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=value)).isoformat()
            parts.append(f"{c.name}={value}")
        position += width
    return ", ".join(parts)


def to_batch(export: Export, rows: list[tuple]) -> pa.RecordBatch:
    """Fetched rows (in Column.select() order) -> one RecordBatch of export.schema()."""
    columns = list(zip(*rows)) if rows else [()] * sum(len(c.select()) for c in export.columns)
    arrays, position = [], 0
    for c in export.columns:
        typ = c.arrow_type()
        values = columns[position]
        if c.kind == "time":
            arrays.append(pa.array(values, pa.int64()).cast(typ))
        elif c.kind == "decimal":
            arrays.append(_checked_decimals(values, typ, export, c.name, rows, lambda i: i))
        elif c.kind in ("decimals", "book"):
            arrays.append(_list_array(export, c, columns, position, rows))
        else:
            arrays.append(pa.array(values, typ))
        position += len(c.select())
    return pa.RecordBatch.from_arrays(arrays, schema=export.schema())


def _list_array(export: Export, c: Column, columns: list, position: int, rows) -> pa.Array:
    """Arrays of decimal text per row -> list<decimal> or list<struct<price, size>>."""
    first = columns[position]
    offsets, total, mask = [0], 0, []
    for levels in first:
        if levels is not None:
            total += len(levels)
        offsets.append(total)
        mask.append(levels is None)
    flat = [v for levels in first if levels for v in levels]
    offsets_arr = pa.array(offsets, pa.int32())
    mask_arr = pa.array(mask, pa.bool_()) if any(mask) else None

    def owner(k: int) -> int:  # the row holding flat value k (only for an error message)
        return bisect.bisect_right(offsets, k) - 1

    typ = c.arrow_type()
    if c.kind == "decimals":
        values = _checked_decimals(flat, typ.value_type, export, c.name, rows, owner)
        return pa.ListArray.from_arrays(offsets_arr, values, type=typ, mask=mask_arr)
    sizes = [v for levels in columns[position + 1] if levels for v in levels]
    struct = typ.value_type
    prices = _checked_decimals(flat, struct.field("price").type, export, f"{c.name} price", rows,
                               owner)
    amounts = _checked_decimals(sizes, struct.field("size").type, export, f"{c.name} size", rows,
                                owner)
    if prices.null_count or amounts.null_count:
        k = next(i for i in range(len(flat)) if not prices[i].is_valid or not amounts[i].is_valid)
        raise ExportValueError(f"{export.name} row {_row_name(export, rows[owner(k)])}: {c.name} has a level "
                               f"without a price or a size")
    levels = pa.StructArray.from_arrays([prices, amounts], fields=list(struct))
    return pa.ListArray.from_arrays(offsets_arr, levels, type=typ, mask=mask_arr)


# -- days --------------------------------------------------------------------------


def days(since: dt.datetime, until: dt.datetime) -> list[tuple[dt.date, dt.datetime, dt.datetime]]:
    """The UTC days [since, until) touches, each with the part of it inside the range."""
    out = []
    day = since.astimezone(UTC).date()
    while True:
        start = dt.datetime.combine(day, dt.time(), UTC)
        if start >= until:
            break
        out.append((day, max(since, start), min(until, start + DAY)))
        day += DAY
    return out


# -- results and progress ----------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What happened to one file. action: written | unchanged | empty | removed."""

    table: str
    day: dt.date | None
    path: Path
    action: str
    rows: int
    bytes: int = 0
    seconds: float = 0.0


class Progress(Protocol):
    def start(self, table: str, day: dt.date | None, rows: int) -> None: ...
    def advance(self, rows: int) -> None: ...
    def done(self, result: Result) -> None: ...


class _Silent:
    def start(self, table, day, rows):
        pass

    def advance(self, rows):
        pass

    def done(self, result):
        pass


# -- the export ----------------------------------------------------------------------


def temp_path(path: Path) -> Path:
    """Where path is written until complete: hidden, and not ending in .parquet."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stored_meta(path: Path) -> dict | None:
    """The export metadata in path's footer; None when there is no readable file."""
    try:
        raw = (pq.read_metadata(path).metadata or {}).get(META_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError, pa.ArrowException):
        return None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(UTC).isoformat()


@contextlib.contextmanager
def _connection(dsn: str) -> Iterator[psycopg2.extensions.connection]:
    conn = connect(dsn, application_name="collectord export", statement_timeout=STATEMENT_TIMEOUT,
                   connect_timeout=CONNECT_TIMEOUT)
    try:
        # One snapshot per file: its fingerprint and its rows are read in the same one.
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _wait(conn) -> None:
    """psycopg2 wait callback: a KeyboardInterrupt (SIGINT, or the CLI's SIGTERM) while
    waiting on the server cancels the query and propagates (psycopg2.extras.wait_select
    would swallow it and wait for the cancelled query's error instead)."""
    while True:
        try:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state == psycopg2.extensions.POLL_READ:
                select.select([conn.fileno()], [], [])
            elif state == psycopg2.extensions.POLL_WRITE:
                select.select([], [conn.fileno()], [])
            else:
                raise psycopg2.OperationalError(f"bad state from poll: {state}")
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                conn.cancel()
            raise


@contextlib.contextmanager
def cancel_on_interrupt() -> Iterator[None]:
    """While inside: every connection of this process waits through _wait, so an
    interrupt reaches Python at once and cancels the running query (process-wide:
    for a command line process, not for a collector)."""
    previous = psycopg2.extensions.get_wait_callback()
    psycopg2.extensions.set_wait_callback(_wait)
    try:
        yield
    finally:
        psycopg2.extensions.set_wait_callback(previous)


def clean_temps(table_dir: Path) -> int:
    """Remove files left in the making by an earlier export that was killed; returns how many."""
    removed = 0
    for leftover in table_dir.glob(".*.parquet.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


def export_table(dsn: str, name: str, out_dir: Path, *, since: dt.datetime | None = None,
                 until: dt.datetime | None = None, force: bool = False,
                 progress: Progress | None = None) -> list[Result]:
    """Export one table into out_dir/name/, returning what happened to each file.

    In order: connect; check the table exists; remove leftover temp files; then per
    UTC day of [since, until) (or once for a table without a time column): read the
    day's fingerprint, skip the day when its file records the same range, schema and
    fingerprint (unless force), remove its file when the day has no rows, else stream
    the rows into the hidden temp file, fsync, and rename it over the final name.
    The caller holds the lock on out_dir (one export writes there at a time).
    """
    export = EXPORTS[name]
    progress = progress or _Silent()
    table_dir = out_dir / name
    table_dir.mkdir(parents=True, exist_ok=True)
    clean_temps(table_dir)
    results = []
    with _connection(dsn) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
            exists = cur.fetchone()[0]
        conn.commit()
        if not exists:
            raise ExportError(f"table {name} does not exist in this database "
                              f"(run `collectord db upgrade`, or check the dsn's schema)")
        if export.time is None:
            spans = [(None, None, None)]
        else:
            if since is None or until is None:
                raise ExportError(f"{name} is exported by day: it needs --since (and --until, default now)")
            spans = days(since, until)
        for day, lo, hi in spans:
            results.append(_export_span(conn, export, table_dir, day, lo, hi, force, progress))
    return results


def _export_span(conn, export: Export, table_dir: Path, day, lo, hi, force: bool,
                 progress: Progress) -> Result:
    """One file: fingerprint, skip or write (see export_table), in one snapshot."""
    t0 = time.monotonic()
    path = table_dir / export.filename(day)
    params = {"lo": lo, "hi": hi}
    try:
        with conn.cursor() as cur:
            cur.execute(export.fingerprint_sql(), params)
            count, *fingerprint = cur.fetchone()
        meta = {"format": FORMAT, "table": export.name, "schema": export.schema_id(),
                "from": _iso(lo) if lo else None, "to": _iso(hi) if hi else None,
                "rows": count, "fingerprint": [str(f) for f in fingerprint]}
        if count == 0 and export.time is not None:
            removed = path.exists()
            if removed:
                path.unlink()
            conn.commit()
            result = Result(export.name, day, path, "removed" if removed else "empty", 0)
            progress.done(result)
            return result
        old = stored_meta(path) if not force else None
        if old is not None and {k: v for k, v in old.items() if k != "exported_at"} == meta:
            conn.commit()
            result = Result(export.name, day, path, "unchanged", count, path.stat().st_size)
            progress.done(result)
            return result
        meta["exported_at"] = _iso(dt.datetime.now(UTC))
        progress.start(export.name, day, count)
        written = _write(conn, export, path, params, meta, progress)
        conn.commit()
    except psycopg2.Error:
        with contextlib.suppress(Exception):
            conn.rollback()
        raise
    if written != count:  # one snapshot: cannot differ, unless the reading is wrong
        raise ExportError(f"{export.name} {day}: wrote {written} rows, the day holds {count}")
    result = Result(export.name, day, path, "written", written, path.stat().st_size, time.monotonic() - t0)
    progress.done(result)
    return result


def _write(conn, export: Export, path: Path, params: dict, meta: dict, progress: Progress) -> int:
    """Stream the rows into a hidden temp file, then fsync and rename it to path."""
    tmp = temp_path(path)
    writer = None
    written = 0
    try:
        writer = pq.ParquetWriter(tmp, export.schema(meta), compression="zstd")
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        # A named cursor is a server-side cursor: each fetchmany is one FETCH of fetch_rows.
        with conn.cursor(name=f"collectord_export_{export.name}") as cur:
            cur.itersize = export.fetch_rows
            cur.execute(export.select_sql(), params)
            while True:
                rows = cur.fetchmany(export.fetch_rows)
                if not rows:
                    break
                batch = to_batch(export, rows)
                pending.append(batch)
                pending_rows += batch.num_rows
                written += batch.num_rows
                del rows
                if pending_rows >= export.group_rows:
                    writer.write_table(pa.Table.from_batches(pending), row_group_size=export.group_rows)
                    pending, pending_rows = [], 0
                progress.advance(batch.num_rows)
        if pending:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=export.group_rows)
        writer.close()
        writer = None
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return written


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["EXPORTS", "Export", "Column", "ExportError", "ExportValueError", "Result", "Progress",
           "cancel_on_interrupt", "days", "export_table", "stored_meta", "temp_path", "to_batch", "clean_temps"]
