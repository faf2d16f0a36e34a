"""Storage throughput: the Writer's batched paths vs one INSERT per row, and a spool replay.

    python -m bench.storage [--dsn DSN] [--rows N] [--naive-rows N] [--book-rows N] [--replay-rows N]
                            [--rounds N]

Everything runs side by side in one process and one run (the machine is
shared and noisy: compare the ratios), each case in a fresh schema that is
dropped afterwards. Cases:
  trades/orderbook  writer copy    Writer(method="copy"): add() + COPY into a temp
                                   staging table + INSERT ... SELECT ... ON CONFLICT,
                                   delivered by the flusher thread (the default)
                    writer copy fg the same with background=False (the caller delivers)
  trades            frames writer  the producer does real work first: json.loads of
                                   WebSocket-like frames and building each row, then
                                   add()/maybe_flush(): flusher thread vs foreground
                                   (_fg), to show what the thread overlaps
                    writer values  Writer(method="values"): add() + execute_values
                    naive          one INSERT ... ON CONFLICT per row, commit each
                    raw COPY       COPY straight into the table, nothing else
                                   (the database's limit here; no idempotence)
  spool replay      N trade rows spooled while the database is unreachable,
                    then replayed by a new Writer until the spool is empty.
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import random
import re
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg2

from workers.storage import TABLES, Writer, migrate
from workers.storage.partitions import PARTITIONED, Partitions, create
from workers.storage.rows import copy_text, row_converter

T0 = datetime(2026, 5, 25, 22, 0, 0, tzinfo=timezone.utc)
TOKENS = [str(10**77 + 7919 * k) for k in range(200)]  # 78-digit ids


def trade_rows(n: int, offset: int = 0) -> list[dict]:
    now = datetime.now(timezone.utc)
    return [
        {
            "token_id": TOKENS[i % len(TOKENS)],
            "condition_id": f"0x{(i % len(TOKENS)) // 2:064x}",
            "ts": T0 + timedelta(milliseconds=i),
            "price": Decimal(f"0.{(i * 37) % 999 + 1:03d}"),
            "size": Decimal(f"{(i * 13) % 5000}.{i % 1000000:06d}"),
            "side": "BUY" if i % 3 else "SELL",
            "tx_hash": f"0x{i:064x}",
            "ordinal": 0,
            "fee_rate_bps": Decimal("0"),
            "source": "ws",
            "received_at": now,
        }
        for i in range(offset, offset + n)
    ]


def book_rows(n: int, levels: int = 20) -> list[dict]:
    now = datetime.now(timezone.utc)
    out = []
    for i in range(n):
        bids = [[f"0.{480 - j:03d}", f"{100 + j}.25"] for j in range(levels)]
        asks = [[f"0.{490 + j:03d}", f"{200 + j}.5"] for j in range(levels)]
        out.append({
            "token_id": TOKENS[i % len(TOKENS)], "condition_id": "0x" + "ab" * 32,
            "ts": T0 + timedelta(seconds=i // len(TOKENS)), "hash": f"{i:040x}",
            "best_bid": bids[0][0], "best_ask": asks[0][0], "spread": "0.010",
            "bid_depth": "2190.0", "ask_depth": "4190.0", "bid_levels": levels, "ask_levels": levels,
            "bids": bids, "asks": asks, "received_at": now,
        })
    return out


def price_rows(n: int) -> list[dict]:
    """n price snapshots: one per token per 10-s cycle, as the prices collector writes them."""
    now = datetime.now(timezone.utc)
    return [
        {"token_id": TOKENS[i % len(TOKENS)], "condition_id": f"0x{(i % len(TOKENS)) // 2:064x}",
         "ts": T0 + timedelta(seconds=10 * (i // len(TOKENS))), "best_bid": Decimal(f"0.{480 + i % 7:03d}"),
         "best_ask": Decimal(f"0.{490 + i % 5:03d}"), "mid": Decimal("0.485"), "last_trade_price": Decimal("0.49"),
         "received_at": now}
        for i in range(n)
    ]


BEFORE_PARTITIONS = 23  # the first migration version of the partitioned schema (0023_partitions)


def migrations_before(version: int, tmp: Path) -> Path:
    """A directory holding the migrations older than version (the schema as it was)."""
    from workers.storage.migrate import discover, migrations_dir

    out = tmp / f"migrations-before-{version}"
    if not out.exists():
        out.mkdir(parents=True)
        for m in discover():
            if m.version < version:
                shutil.copy(migrations_dir() / f"{m.name}.sql", out / f"{m.name}.sql")
    return out


def real_book_rows(n: int) -> list[dict]:
    """n order-book rows built from the real books recorded in tests/data (42 to 157 levels
    a side), parsed as the orderbooks collector parses them, each repeated under other
    tokens and times: what real depth and real numbers cost, compression included."""
    from workers.orderbooks import parse_book

    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    books = [parse_book(json.loads((data / name).read_text()))
             for name in ("clob_book_559651_yes.json", "clob_book_559651_no.json", "clob_book_neg_risk.json")]
    out = []
    for i in range(n):
        row = dict(books[i % len(books)])
        row.update(token_id=TOKENS[i % len(TOKENS)], ts=T0 + timedelta(seconds=i // len(TOKENS)), hash=f"{i:040x}")
        out.append(row)
    return out


class Schema:
    """A fresh migrated schema on the server (all migrations, or those in `directory`); dropped on exit."""

    def __init__(self, dsn: str, directory: Path | None = None):
        self.server = dsn
        self.directory = directory
        self.name = "bench_" + uuid.uuid4().hex[:10]

    def __enter__(self) -> str:
        conn = psycopg2.connect(self.server, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{self.name}"')
        conn.close()
        params = psycopg2.extensions.parse_dsn(self.server)
        opt = f"-csearch_path={self.name}"
        params["options"] = f"{params['options']} {opt}" if params.get("options") else opt
        self.dsn = psycopg2.extensions.make_dsn(**params)
        migrate(self.dsn, directory=self.directory)
        return self.dsn

    def __exit__(self, *exc) -> None:
        conn = psycopg2.connect(self.server, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        conn.close()


def count(dsn: str, table: str) -> int:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        n = cur.fetchone()[0]
    conn.close()
    return n


def run_writer(dsn: str, table: str, rows: list[dict], method: str, tmp: Path,
               background: bool = True) -> tuple[float, dict]:
    """rows/s through Writer.add + maybe_flush (the collector's calls), all committed."""
    w = Writer(dsn, tmp / f"spool-{uuid.uuid4().hex[:6]}", name="bench", method=method,
               background=background).open()
    chunk = 100  # collectors add a message's worth at a time
    started = time.perf_counter()
    for i in range(0, len(rows), chunk):
        w.add(table, rows[i : i + chunk])
        w.maybe_flush()
    w.flush()
    elapsed = time.perf_counter() - started
    stats = w.stats()
    w.close()
    assert stats["rows_written"] == len(rows) and stats["rows_spooled"] == 0, stats
    assert count(dsn, table) == len(rows)
    return len(rows) / elapsed, stats


def frames_for(n: int, per_frame: int = 20) -> list[str]:
    """WebSocket-like text frames of last_trade_price events (what the trade listener parses)."""
    frames = []
    for f in range(0, n, per_frame):
        events = [
            {"event_type": "last_trade_price", "asset_id": TOKENS[i % len(TOKENS)], "market": f"0x{i % 100:064x}",
             "price": f"0.{(i * 37) % 999 + 1:03d}", "size": f"{(i * 13) % 5000}.{i % 1000000:06d}",
             "side": "BUY" if i % 3 else "SELL", "fee_rate_bps": "0", "timestamp": str(1779746400000 + i),
             "transaction_hash": f"0x{i:064x}"}
            for i in range(f, min(n, f + per_frame))
        ]
        frames.append(json.dumps(events))
    return frames


def run_writer_frames(dsn: str, frames: list[str], n: int, tmp: Path, background: bool) -> float:
    """rows/s when the producer does real work per row: json.loads + build the row, then add()."""
    w = Writer(dsn, tmp / f"spool-{uuid.uuid4().hex[:6]}", name="frames", background=background).open()
    started = time.perf_counter()
    for text in frames:
        now = datetime.now(timezone.utc)
        rows = [
            {"token_id": e["asset_id"], "condition_id": e["market"],
             "ts": datetime.fromtimestamp(int(e["timestamp"]) / 1000, timezone.utc),
             "price": Decimal(e["price"]), "size": Decimal(e["size"]), "side": e["side"],
             "tx_hash": e["transaction_hash"], "ordinal": 0, "fee_rate_bps": Decimal(e["fee_rate_bps"]),
             "source": "ws", "received_at": now}
            for e in json.loads(text)
        ]
        w.add("trades", rows)
        w.maybe_flush()
    w.flush()
    elapsed = time.perf_counter() - started
    stats = w.stats()
    w.close()
    assert stats["rows_written"] == n and count(dsn, "trades") == n, stats
    return n / elapsed


def run_naive(dsn: str, table: str, rows: list[dict]) -> float:
    """One INSERT ... ON CONFLICT DO NOTHING per row, one commit per row."""
    t = TABLES[table]
    cols = t.column_names
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) ON CONFLICT DO NOTHING"
    convert = row_converter(t.columns)
    conn = psycopg2.connect(dsn, connect_timeout=10)
    texts = [convert(row) for row in rows]
    if t.fill is not None:
        for row in texts:
            t.fill(row)
    if table in PARTITIONED:  # the partitions exist beforehand: not part of the per-row cost
        create(conn, table, Partitions({table: cols}).days(table, texts))
    started = time.perf_counter()
    with conn.cursor() as cur:
        for row in rows:
            values = [row.get(c) for c in cols]
            values = [json.dumps(v) if isinstance(v, (list, dict)) else v for v in values]
            if t.fill is not None:
                values[cols.index("trade_day")] = values[cols.index("ts")].astimezone(timezone.utc).date()
            cur.execute(sql, values)
            conn.commit()
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


def schema_columns(dsn: str, table: str) -> set[str]:
    """The columns table has in the DSN's current schema."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = %s", (table,))
        have = {r[0] for r in cur.fetchall()}
    conn.close()
    return have


def is_partitioned(conn, table: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(%s)", (table,))
        answer = bool(cur.fetchone()[0])
    conn.commit()
    return answer


def run_raw_copy(dsn: str, table: str, rows: list[dict]) -> float:
    """COPY straight into the table in 5000-row transactions (serialization included).

    Only the columns the schema's table has (the schema before 0023 has no trades.trade_day);
    a derived column the table has is filled the way the Writer fills it.
    """
    t = TABLES[table]
    have = schema_columns(dsn, table)
    keep = [i for i, c in enumerate(t.column_names) if c in have]
    names = [t.column_names[i] for i in keep]
    convert = row_converter(t.columns)
    conn = psycopg2.connect(dsn, connect_timeout=10)
    if "trade_day" in have or (table in PARTITIONED and table != "trades" and is_partitioned(conn, table)):
        texts = [convert(r) for r in rows]
        if t.fill is not None:
            for row in texts:
                t.fill(row)
        create(conn, table, Partitions({table: t.column_names}).days(table, texts))  # beforehand, untimed
    started = time.perf_counter()
    with conn.cursor() as cur:
        for i in range(0, len(rows), 5000):
            batch = [convert(r) for r in rows[i : i + 5000]]
            if t.fill is not None:
                for row in batch:
                    t.fill(row)
            text = copy_text([[row[j] for j in keep] for row in batch])
            cur.copy_expert(f"COPY {table} ({', '.join(names)}) FROM STDIN", io.StringIO(text))
            conn.commit()
    elapsed = time.perf_counter() - started
    conn.close()
    return len(rows) / elapsed


def table_bytes(dsn: str, table: str) -> dict:
    """Bytes on disk of table and, when it is partitioned, all its partitions: heap (with
    TOAST, free space and visibility maps) and indexes, and its row count."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SELECT coalesce(sum(pg_table_size(c.oid)), 0), coalesce(sum(pg_indexes_size(c.oid)), 0),"
                    " count(*) FILTER (WHERE c.relkind = 'r')"
                    " FROM pg_class c WHERE c.oid = to_regclass(%s)"
                    " OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass(%s))",
                    (table, table))
        heap, indexes, relations = cur.fetchone()
        cur.execute(f"SELECT count(*) FROM {table}")
        rows = cur.fetchone()[0]
    conn.close()
    return {"rows": rows, "heap": int(heap), "indexes": int(indexes), "tables": relations}


def run_partitioning(args, tmp: Path, rounds: int) -> dict:
    """Per table, the same rows into the schema before 0023 and after it, side by side:
    raw COPY rows/s (5000-row transactions), the Writer's rows/s (where the Writer can
    write the old schema: not trades, whose rows now carry trade_day), and bytes per row
    on disk (heap + indexes) once all rows are in."""
    before_dir = migrations_before(BEFORE_PARTITIONS, tmp)
    inputs = {"trades": trade_rows(args.rows), "price_snapshots": price_rows(args.rows),
              "orderbook_snapshots": book_rows(args.book_rows)}
    runs: dict[tuple, list[float]] = {}
    sizes: dict[tuple, dict] = {}
    for _ in range(rounds):
        for table, rows in inputs.items():
            for when, directory in (("before", before_dir), ("after", None)):
                with Schema(args.dsn, directory) as dsn:
                    runs.setdefault((table, when, "raw_copy"), []).append(run_raw_copy(dsn, table, rows))
                    sizes[(table, when)] = table_bytes(dsn, table)
                if table == "trades" and when == "before":
                    continue
                with Schema(args.dsn, directory) as dsn:
                    runs.setdefault((table, when, "writer"), []).append(run_writer(dsn, table, rows, "copy", tmp)[0])
    out: dict = {}
    for (table, when), size in sizes.items():
        n = max(1, size["rows"])
        out.setdefault(table, {})[when] = {
            "rows": size["rows"], "partitions": size["tables"] if when == "after" else 0,
            "heap_bytes_per_row": round(size["heap"] / n, 1), "index_bytes_per_row": round(size["indexes"] / n, 1),
            "bytes_per_row": round((size["heap"] + size["indexes"]) / n, 1),
            "raw_copy_rows_per_s": round(statistics.median(runs[(table, when, "raw_copy")])),
            "writer_rows_per_s": (round(statistics.median(runs[(table, when, "writer")]))
                                  if (table, when, "writer") in runs else None),
        }
    return out


BOOK_FORMATS = {
    # name: (DDL of bids and asks, SQL computing them from the jsonb columns of `j`)
    "jsonb": ("bids jsonb, asks jsonb", "j.bids, j.asks"),
    "jsonb_numbers": ("bids jsonb, asks jsonb",
                      "(SELECT jsonb_agg(jsonb_build_array((e->>0)::numeric, (e->>1)::numeric) ORDER BY o)"
                      " FROM jsonb_array_elements(j.bids) WITH ORDINALITY x(e, o)),"
                      " (SELECT jsonb_agg(jsonb_build_array((e->>0)::numeric, (e->>1)::numeric) ORDER BY o)"
                      " FROM jsonb_array_elements(j.asks) WITH ORDINALITY x(e, o))"),
    "numeric_2d": ("bids numeric[], asks numeric[]",
                   "(SELECT array_agg(ARRAY[(e->>0)::numeric, (e->>1)::numeric] ORDER BY o)"
                   " FROM jsonb_array_elements(j.bids) WITH ORDINALITY x(e, o)),"
                   " (SELECT array_agg(ARRAY[(e->>0)::numeric, (e->>1)::numeric] ORDER BY o)"
                   " FROM jsonb_array_elements(j.asks) WITH ORDINALITY x(e, o))"),
    "numeric_arrays": ("bid_prices numeric[], bid_sizes numeric[], ask_prices numeric[], ask_sizes numeric[]",
                       "(SELECT array_agg((e->>0)::numeric ORDER BY o) FROM jsonb_array_elements(j.bids)"
                       " WITH ORDINALITY x(e, o)),"
                       " (SELECT array_agg((e->>1)::numeric ORDER BY o) FROM jsonb_array_elements(j.bids)"
                       " WITH ORDINALITY x(e, o)),"
                       " (SELECT array_agg((e->>0)::numeric ORDER BY o) FROM jsonb_array_elements(j.asks)"
                       " WITH ORDINALITY x(e, o)),"
                       " (SELECT array_agg((e->>1)::numeric ORDER BY o) FROM jsonb_array_elements(j.asks)"
                       " WITH ORDINALITY x(e, o))"),
}
_BOOK_HEAD = ("token_id text NOT NULL, condition_id text, ts timestamptz NOT NULL, hash text NOT NULL DEFAULT '',"
              " best_bid numeric, best_ask numeric, spread numeric, bid_depth numeric, ask_depth numeric,"
              " bid_levels int, ask_levels int")
_BOOK_HEAD_COLS = ("token_id, condition_id, ts, hash, best_bid, best_ask, spread, bid_depth, ask_depth, bid_levels,"
                   " ask_levels")


def run_book_formats(args, tmp: Path) -> dict:
    """The same order books stored as each BOOK_FORMATS variant (plain tables with the
    orderbook_snapshots key): bytes per snapshot on disk (heap with TOAST + the key's
    index) and COPY rows/s into an empty table of the format."""
    out = {}
    with Schema(args.dsn) as dsn:
        books = (real_book_rows(args.book_rows) if args.book_levels == 0
                 else book_rows(args.book_rows, levels=args.book_levels))
        run_writer(dsn, "orderbook_snapshots", books, "copy", tmp)
        conn = psycopg2.connect(dsn, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            for name, (ddl, expr) in BOOK_FORMATS.items():
                for suffix in ("", "_load"):
                    cur.execute(f"CREATE TABLE fmt_{name}{suffix} ({_BOOK_HEAD}, {ddl}, received_at timestamptz,"
                                f" PRIMARY KEY (token_id, ts, hash))")
                head = ", ".join("j." + c.strip() for c in _BOOK_HEAD_COLS.split(","))
                cur.execute(f"INSERT INTO fmt_{name} SELECT {head}, {expr}, j.received_at FROM orderbook_snapshots j")
                buf = io.BytesIO()
                cur.copy_expert(f"COPY fmt_{name} TO STDOUT", buf)
                data = buf.getvalue()
                started = time.perf_counter()
                for _ in range(3):
                    cur.execute(f"TRUNCATE fmt_{name}_load")
                    cur.copy_expert(f"COPY fmt_{name}_load FROM STDIN", io.BytesIO(data))
                rate = 3 * args.book_rows / (time.perf_counter() - started)
                size = table_bytes(dsn, f"fmt_{name}_load")
                n = max(1, size["rows"])
                out[name] = {"bytes_per_snapshot": round((size["heap"] + size["indexes"]) / n, 1),
                             "heap_bytes_per_snapshot": round(size["heap"] / n, 1),
                             "copy_rows_per_s": round(rate), "copy_text_bytes_per_snapshot": round(len(data) / n, 1)}
        conn.close()
    return out


def run_migration(args, tmp: Path) -> dict:
    """A schema as before 0023 filled server-side with N rows: 45% trades (78-digit tokens,
    66-char hashes, over 30 days), 45% price snapshots, 10% twenty-level books; then 0023
    applied, timed; the row counts checked equal after."""
    n = max(1, args.migrate_rows * 45 // 100)
    books = max(1, args.migrate_rows - 2 * n)
    with Schema(args.dsn, migrations_before(BEFORE_PARTITIONS, tmp)) as dsn:
        conn = psycopg2.connect(dsn, connect_timeout=10)
        with conn, conn.cursor() as cur:
            cur.execute(f"""INSERT INTO trades (token_id, condition_id, ts, price, size, side, tx_hash, ordinal,
                                                fee_rate_bps, source, received_at)
                SELECT '1' || lpad((i % 20000)::text, 77, '0'), '0x' || md5((i % 10000)::text) || md5((i % 10000)::text),
                       timestamptz '2026-11-01 00:00:00+00' + i * (interval '30 days' / {n}),
                       round((1 + i % 999) / 1000.0, 3), round((i % 50000) / 100.0 + 1, 2),
                       CASE WHEN i % 3 = 0 THEN 'SELL' ELSE 'BUY' END, '0x' || md5(i::text) || md5((i + 1)::text),
                       0, 0, CASE WHEN i % 20 = 0 THEN 'backfill' ELSE 'ws' END, now()
                  FROM generate_series(1, {n}) AS i""")
            cur.execute(f"""INSERT INTO price_snapshots (token_id, ts, condition_id, best_bid, best_ask, mid,
                                                         last_trade_price, received_at)
                SELECT '1' || lpad((i % 20000)::text, 77, '0'), timestamptz '2026-11-01 00:00:00+00'
                       + (i / 20000) * interval '10 s', '0x' || md5((i % 10000)::text), 0.48, 0.49, 0.485, 0.49, now()
                  FROM generate_series(1, {n}) AS i""")
            level = "jsonb_build_array(to_char(0.5 + k / 1000.0, 'FM0.000'), (100 + k)::text || '.25')"
            cur.execute(f"""INSERT INTO orderbook_snapshots (token_id, ts, hash, best_bid, best_ask, bids, asks,
                                                             received_at)
                SELECT '1' || lpad((i % 20000)::text, 77, '0'), timestamptz '2026-11-01 00:00:00+00'
                       + (i / 20000) * interval '60 s', md5(i::text), 0.48, 0.49,
                       (SELECT jsonb_agg({level}) FROM generate_series(1, 20) k),
                       (SELECT jsonb_agg({level}) FROM generate_series(21, 40) k), now()
                  FROM generate_series(1, {books}) AS i""")
        conn.close()
        before = {t: count(dsn, t) for t in ("trades", "price_snapshots", "orderbook_snapshots")}
        started = time.perf_counter()
        applied = migrate(dsn)
        seconds = time.perf_counter() - started
        after = {t: count(dsn, t) for t in before}
        parts = {t: table_bytes(dsn, t)["tables"] for t in before}
    assert applied[0] == BEFORE_PARTITIONS and after == before, (applied, before, after)
    total = sum(before.values())
    return {"rows": before, "total_rows": total, "seconds": round(seconds, 2),
            "rows_per_s": round(total / seconds), "partitions": parts}


# The trades unique key as it is (0023) and the two narrower ones it could become: a
# 16-byte digest of the natural key in a generated column, with token_id kept as a key
# column (what a Citus shard needs: docs/scaling.md) or inside the digest. trim_scale
# keeps 0.48 and 0.480 one key, as the numeric columns do.
_DIGEST = ("md5({tok}tx_hash || '|' || trim_scale(price)::text || '|' || trim_scale(size)::text || '|' || side"
           " || '|' || ordinal::text)::uuid")
KEY_VARIANTS = {
    "natural": (),
    "digest+token": ("ALTER TABLE trades ADD COLUMN key uuid GENERATED ALWAYS AS"
                     " (" + _DIGEST.format(tok="") + ") STORED",
                     "CREATE UNIQUE INDEX trades_key_digest ON trades (token_id, key, trade_day)",
                     "DROP INDEX trades_key"),
    "digest": ("ALTER TABLE trades ADD COLUMN key uuid GENERATED ALWAYS AS"
               " (" + _DIGEST.format(tok="token_id || '|' || ") + ") STORED",
               "CREATE UNIQUE INDEX trades_key_digest ON trades (key, trade_day)",
               "DROP INDEX trades_key"),
}


def key_batches(n: int, batch: int = 5000, seed: int = 7) -> list[bytes]:
    """n trades rows as COPY text, in 5,000-row batches: 100 tokens of 78 digits, random
    66-character transaction hashes (as the exchange's are), one UTC day, ms apart."""
    rnd = random.Random(seed)
    tokens = [str(10**77 + 7919 * 1000003 * k) for k in range(100)]
    base = datetime(2026, 6, 1, 1, 0, tzinfo=timezone.utc)
    out = []
    for start in range(0, n, batch):
        lines = []
        for i in range(start, min(n, start + batch)):
            ts = (base + timedelta(milliseconds=i)).isoformat()
            lines.append(f"{tokens[rnd.randrange(100)]}\t0x{rnd.getrandbits(256):064x}\t{ts}\t0.{rnd.randrange(1, 999):03d}"
                         f"\t{rnd.randrange(1, 100000) / 100}\t{'BUY' if i & 1 else 'SELL'}\t0x{rnd.getrandbits(256):064x}"
                         f"\t0\t0\tws\t{ts}\t2026-06-01\n")
        out.append("".join(lines).encode())
    return out


def run_keys(args) -> dict:
    """The same rows COPYed (5,000-row transactions) into trades with each KEY_VARIANTS
    unique key, in fresh schemas one after the other: per segment of the fill, rows/s
    (wall), the backend's CPU per row (/proc) and WAL bytes per row; at the end, each
    index's size. The table grows past shared_buffers, as a day's partition does."""
    from bench._stages import _backend_cpu

    batches = key_batches(args.key_rows)
    columns = ", ".join(c for c, _ in TABLES["trades"].columns)
    per_segment = max(1, args.key_rows // 4 // 5000)
    out = {}
    for name, ddl in KEY_VARIANTS.items():
        with Schema(args.dsn) as dsn:
            conn = psycopg2.connect(dsn, connect_timeout=10)
            create(conn, "trades", [date(2026, 6, 1)])  # first: the DDL below then reaches it
            with conn.cursor() as cur:
                for sql in ddl:
                    cur.execute(sql)
                conn.commit()
                segments = []
                for first in range(0, len(batches), per_segment):
                    part = batches[first:first + per_segment]
                    cur.execute("SELECT pg_current_wal_lsn()")
                    lsn = cur.fetchone()[0]
                    cpu, wall = _backend_cpu(cur), time.perf_counter()
                    for data in part:
                        cur.copy_expert(f"COPY trades ({columns}) FROM STDIN", io.BytesIO(data), size=len(data) + 1)
                        conn.commit()
                    wall, cpu = time.perf_counter() - wall, _backend_cpu(cur) - cpu
                    cur.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,))
                    wal = float(cur.fetchone()[0])
                    rows = sum(d.count(b"\n") for d in part)
                    segments.append({"rows_after": (first + len(part)) * 5000, "rows_per_s": round(rows / wall),
                                     "server_us_per_row": round(cpu / rows * 1e6, 2),
                                     "wal_bytes_per_row": round(wal / rows)})
                    conn.commit()
                # The same key must be refused by each variant: the first row again, its
                # price and size written with trailing zeros (numerically equal).
                first = batches[0].split(b"\n", 1)[0].decode().split("\t")
                first[3], first[4] = first[3] + "00", first[4] + ("" if "." in first[4] else ".") + "0"
                try:
                    cur.copy_expert(f"COPY trades ({columns}) FROM STDIN", io.StringIO("\t".join(first) + "\n"))
                    refuses = False
                except psycopg2.errors.UniqueViolation:
                    refuses = True
                conn.rollback()
                cur.execute("SELECT i.indexrelid::regclass::text, pg_relation_size(i.indexrelid) FROM pg_index i"
                            " WHERE i.indrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'trades'::regclass)"
                            " AND pg_relation_size(i.indexrelid) > 65536")
                indexes = {re.sub(r"_p\d{8}", "", n): round(b / args.key_rows, 1) for n, b in cur.fetchall()}
                conn.commit()
            conn.close()
        out[name] = {"segments": segments, "index_bytes_per_row": indexes, "refuses_a_repeat": refuses}
    return out


def report_keys(args, keys: dict) -> None:
    conn = psycopg2.connect(args.dsn, connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SHOW shared_buffers")
        buffers = cur.fetchone()[0]
    conn.close()
    print(f"\ntrades unique key, {args.key_rows:,} rows COPYed in 5,000-row transactions into one day's partition"
          f" (shared_buffers {buffers}); per quarter of the fill: rows/s, server CPU us/row, WAL bytes/row")
    for name, k in keys.items():
        segs = "  ".join(f"{s['rows_after'] // 1000:>5}k: {s['rows_per_s']:>6,}/s {s['server_us_per_row']:>5.1f}us"
                         f" {s['wal_bytes_per_row']:>5}B" for s in k["segments"])
        print(f"{name:<13}{segs}")
        print(f"{'':<13}index bytes per row: " + ", ".join(f"{n} {b}" for n, b in k["index_bytes_per_row"].items())
              + f"; refuses the first row again (0.480 for 0.48): {'yes' if k['refuses_a_repeat'] else 'NO'}")


def run_replay(dsn: str, n: int, tmp: Path) -> dict:
    """Spool n trade rows with the database unreachable, then time a fresh Writer draining it."""
    spool = tmp / "replay-spool"
    down = Writer("host=127.0.0.1 port=1 dbname=none", spool, name="replay", connect_timeout=1).open()
    started = time.perf_counter()
    rows = trade_rows(n, offset=10**7)
    for i in range(0, n, 5000):
        down.add("trades", rows[i : i + 5000])
        down.flush()
    down.close()
    spool_s = time.perf_counter() - started
    stats = down.stats()
    assert stats["rows_spooled"] == n, stats
    w = Writer(dsn, spool, name="replay", replay_budget=3600).open()
    started = time.perf_counter()
    while w.stats()["spool_segments"]:  # the flusher thread replays; poll gently
        time.sleep(0.005)
    replay_s = time.perf_counter() - started
    w.close()
    assert count(dsn, "trades") == n
    return {"rows": n, "spool_bytes": stats["spool_bytes"], "spool_s": round(spool_s, 3),
            "replay_s": round(replay_s, 3), "replay_rows_per_s": round(n / replay_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres"))
    parser.add_argument("--rows", type=int, default=200_000, help="trade rows per batched case")
    parser.add_argument("--naive-rows", type=int, default=5_000, help="rows for the one-INSERT-per-row case")
    parser.add_argument("--book-rows", type=int, default=20_000, help="order-book rows (20 levels a side)")
    parser.add_argument("--replay-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (medians reported)")
    parser.add_argument("--book-levels", type=int, default=20, help="levels a side in the book format comparison (0: the real books in tests/data)")
    parser.add_argument("--migrate-rows", type=int, default=0,
                        help="time migration 0023 on a database of N rows (45%% trades, 45%% prices, 10%% books)")
    parser.add_argument("--key-rows", type=int, default=2_000_000, help="trade rows per variant in the keys case")
    parser.add_argument("--cases", default="writer,partitions,formats",
                        help="comma list of: writer (the Writer's paths, spool replay), partitions (before/after "
                             "0023: bytes per row, insert rates), formats (order book storage formats), keys (the trades "
                             "unique key, natural vs digests, as one day's partition grows past shared_buffers); "
                             "--migrate-rows adds the migration")
    args = parser.parse_args(argv)
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    logging.getLogger("workers.storage").setLevel(logging.ERROR)  # the replay case warns by design

    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    runs: dict[str, dict[str, list[float]]] = {"trades": {}, "orderbook_snapshots": {}}
    replays: list[dict] = []

    def record(table: str, key: str, value: float) -> None:
        runs[table].setdefault(key, []).append(value)

    try:
        if "writer" in cases:
            trades_rows, trades_naive = trade_rows(args.rows), trade_rows(args.naive_rows, offset=5 * 10**6)
            books, books_naive = book_rows(args.book_rows), book_rows(min(args.naive_rows, args.book_rows))
            frames = frames_for(args.rows)
        # The inputs are millions of objects a real collector never holds at once;
        # keep the cyclic GC from re-scanning them during every timed case.
        gc.collect()
        gc.freeze()
        # Rounds interleave every case, so a burst of load from other users of the
        # machine hits all of them alike; the table shows medians.
        for _ in range(args.rounds if "writer" in cases else 0):
            for table, rows, naive_rows in (("trades", trades_rows, trades_naive),
                                            ("orderbook_snapshots", books, books_naive)):
                with Schema(args.dsn) as dsn:
                    record(table, "writer_copy", run_writer(dsn, table, rows, "copy", tmp)[0])
                with Schema(args.dsn) as dsn:
                    record(table, "writer_copy_fg", run_writer(dsn, table, rows, "copy", tmp, background=False)[0])
                with Schema(args.dsn) as dsn:
                    record(table, "writer_values", run_writer(dsn, table, rows, "values", tmp)[0])
                with Schema(args.dsn) as dsn:
                    record(table, "naive", run_naive(dsn, table, naive_rows))
                with Schema(args.dsn) as dsn:
                    record(table, "raw_copy", run_raw_copy(dsn, table, rows))
            for background, key in ((True, "frames_writer"), (False, "frames_writer_fg")):
                with Schema(args.dsn) as dsn:
                    record("trades", key, run_writer_frames(dsn, frames, args.rows, tmp, background))
            with Schema(args.dsn) as dsn:
                replays.append(run_replay(dsn, args.replay_rows, tmp))
            shutil.rmtree(tmp / "replay-spool", ignore_errors=True)
        partitioning = run_partitioning(args, tmp, args.rounds) if "partitions" in cases else None
        formats = run_book_formats(args, tmp) if "formats" in cases else None
        migration = run_migration(args, tmp) if args.migrate_rows > 0 else None
        keys = run_keys(args) if "keys" in cases else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary: dict = {"rounds": args.rounds, "rows": args.rows, "book_rows": args.book_rows}
    if "writer" in cases:
        summary.update(report_writer(args, runs, replays))
    if partitioning is not None:
        print(f"\nbefore/after partitioning (0023), median of {args.rounds} round(s); bytes on disk per row once all "
              "rows are in (heap with TOAST + indexes)")
        print(f"{'table':<21}{'schema':<8}{'rows':>9}{'parts':>6}{'heap B':>9}{'index B':>9}{'total B':>9}"
              f"{'raw COPY/s':>12}{'Writer/s':>10}")
        for table, whens in partitioning.items():
            for when in ("before", "after"):
                f = whens[when]
                writer = f"{f['writer_rows_per_s']:,}" if f["writer_rows_per_s"] is not None else "n/a"
                print(f"{table:<21}{when:<8}{f['rows']:>9,}{f['partitions']:>6}{f['heap_bytes_per_row']:>9}"
                      f"{f['index_bytes_per_row']:>9}{f['bytes_per_row']:>9}{f['raw_copy_rows_per_s']:>12,}{writer:>10}")
        summary["partitioning"] = partitioning
    if formats is not None:
        depth = f"{args.book_levels} levels a side" if args.book_levels else "real books (tests/data, 42-157 levels a side)"
        print(f"\norder book formats, {args.book_rows:,} snapshots of {depth} "
              "(heap with TOAST + primary key)")
        print(f"{'format':<16}{'bytes/snapshot':>15}{'heap':>9}{'COPY rows/s':>13}{'vs jsonb':>9}")
        base = formats["jsonb"]["bytes_per_snapshot"]
        for name, f in formats.items():
            print(f"{name:<16}{f['bytes_per_snapshot']:>15}{f['heap_bytes_per_snapshot']:>9}{f['copy_rows_per_s']:>13,}"
                  f"{f['bytes_per_snapshot'] / base:>9.2f}")
        summary["book_formats"] = formats
    if migration is not None:
        print(f"\nmigration 0023 of a populated database: {migration['total_rows']:,} rows ({migration['rows']}) in "
              f"{migration['seconds']:.1f} s = {migration['rows_per_s']:,} rows/s; partitions {migration['partitions']}")
        summary["migration"] = migration
    if keys is not None:
        report_keys(args, keys)
        summary["keys"] = keys
    print(json.dumps(summary, default=str))
    return 0


def report_writer(args, runs: dict, replays: list[dict]) -> dict:
    """Print the Writer cases' table; return their figures for the JSON line."""
    results = {t: {k: statistics.median(v) for k, v in r.items()} for t, r in runs.items()}
    replay = sorted(replays, key=lambda r: r["replay_s"])[len(replays) // 2]
    print(f"median of {args.rounds} interleaved round(s); naive = one INSERT + COMMIT per row")
    print(f"{'table':<22}{'path':<18}{'rows/s':>10}{'x naive':>9}{'/ raw COPY':>12}   all rounds")
    for table, r in results.items():
        for path in ("writer_copy", "writer_copy_fg", "writer_values", "naive", "raw_copy", "frames_writer",
                     "frames_writer_fg"):
            if path not in r:
                continue
            every = " ".join(f"{v:,.0f}" for v in runs[table][path])
            print(f"{table:<22}{path:<18}{r[path]:>10,.0f}{r[path] / r['naive']:>9.1f}"
                  f"{r[path] / r['raw_copy']:>12.2f}   {every}")
    print(f"spool replay: {replay['rows']:,} trade rows ({replay['spool_bytes'] / 1e6:.1f} MB spooled in "
          f"{replay['spool_s']:.2f} s) replayed in {replay['replay_s']:.2f} s = {replay['replay_rows_per_s']:,} rows/s"
          f" (all rounds: {', '.join('%.2f s' % r['replay_s'] for r in replays)})")
    return {
        "naive_rows": args.naive_rows,
        **{f"{t}_{k}": round(v) for t, r in results.items() for k, v in r.items()},
        "trades_copy_vs_naive": round(results["trades"]["writer_copy"] / results["trades"]["naive"], 1),
        "trades_copy_vs_values": round(results["trades"]["writer_copy"] / results["trades"]["writer_values"], 2),
        "books_copy_vs_naive": round(results["orderbook_snapshots"]["writer_copy"]
                                     / results["orderbook_snapshots"]["naive"], 1),
        "replay": replay,
        "replay_s_all": [r["replay_s"] for r in replays],
    }


if __name__ == "__main__":
    raise SystemExit(main())
