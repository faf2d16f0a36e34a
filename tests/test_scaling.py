"""The property docs/scaling.md relies on: every unique key of a per-token table includes token_id.

Past one PostgreSQL, the plan distributes the per-token tables by token_id (Citus
create_distributed_table) and replicates the small ones (create_reference_table).
A distributed table can only enforce a unique index or exclusion constraint that
includes the distribution column (each shard checks its own rows), so every such
index of those tables must list token_id as a key column. The schema is read live
from pg_index after the migrations (other migrations add columns to these keys,
e.g. a partition column; that is fine as long as token_id stays in), never from a
list kept here.
"""

from __future__ import annotations

import shutil

import psycopg2

from tests.conftest import query
from workers.storage import migrate
from workers.storage.migrate import migrations_dir
from workers.storage.tables import TABLES

# Distributed by token_id in docs/scaling.md (book_events: once a migration creates it).
DISTRIBUTED = ("trades", "price_snapshots", "orderbook_snapshots", "feed_gaps", "feed_coverage", "book_events")
# Replicated to every node (reference tables) or left on the coordinator: exempt.
REFERENCE = ("markets", "tokens", "followed_tokens", "resolutions", "market_events", "schema_migrations")


def unique_keys(dsn: str, table: str) -> dict[str, list[str | None]]:
    """Every unique index and exclusion constraint of `table` in the current schema:
    index name -> its key columns in order (None for an expression)."""
    rows = query(dsn, """
        SELECT c.relname, k.n, a.attname
          FROM pg_index i
          JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_class t ON t.oid = i.indrelid
          JOIN pg_namespace ns ON ns.oid = t.relnamespace AND ns.nspname = current_schema()
          CROSS JOIN LATERAL unnest(i.indkey[0:i.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, n)
          LEFT JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum AND k.attnum <> 0
         WHERE t.relname = %s AND (i.indisunique OR i.indisexclusion)
         ORDER BY c.relname, k.n""", (table,))
    out: dict[str, list[str | None]] = {}
    for index, _, column in rows:
        out.setdefault(index, []).append(column)
    return out


def without(dsn: str, table: str, column: str = "token_id") -> list[str]:
    """The unique indexes of `table` whose key columns do not include `column` (an
    expression over it does not count: a shard cannot check it against other shards)."""
    return sorted(name for name, columns in unique_keys(dsn, table).items() if column not in columns)


def tables(dsn: str) -> set[str]:
    """The schema's tables, partitioned ones by their parent (a day's partition is not a table of its own)."""
    return {r[0] for r in query(dsn, "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                                     " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
                                     " AND NOT c.relispartition")}


def test_every_unique_key_of_a_distributed_table_includes_token_id(pg_dsn):
    migrate(pg_dsn)
    present = tables(pg_dsn)
    assert {"trades", "price_snapshots", "orderbook_snapshots", "feed_gaps", "feed_coverage"} <= present
    for table in DISTRIBUTED:
        if table not in present:
            continue
        keys = unique_keys(pg_dsn, table)
        assert keys, f"{table} has no unique key at all: writes could not be idempotent"
        assert without(pg_dsn, table) == [], f"{table}: unique keys without token_id: {keys}"
    # Every table is placed: a new table must be added to one of the two lists (and the doc).
    assert present <= set(DISTRIBUTED) | set(REFERENCE), present - set(DISTRIBUTED) - set(REFERENCE)


def test_the_writers_conflict_keys_of_distributed_tables_include_token_id():
    """INSERT ... ON CONFLICT on a distributed table routes by the distribution column."""
    for name, table in TABLES.items():
        if name in DISTRIBUTED:
            assert "token_id" in table.key, (name, table.key)


def test_the_check_catches_a_key_without_token_id(pg_dsn, tmp_path):
    """It fails on a real violation: feed_gaps' serial primary key before migration 0024, and
    a serial primary key, a unique index over an expression of token_id, an exclusion constraint."""
    before = tmp_path / "migrations"
    before.mkdir()
    for path in migrations_dir().glob("*.sql"):
        if int(path.name[:4]) < 24:
            shutil.copy(path, before / path.name)
    migrate(pg_dsn, directory=before)
    assert without(pg_dsn, "feed_gaps") == ["feed_gaps_pkey"], unique_keys(pg_dsn, "feed_gaps")
    migrate(pg_dsn)  # 0024 fixes it
    assert without(pg_dsn, "feed_gaps") == []
    assert unique_keys(pg_dsn, "feed_gaps")["feed_gaps_pkey"] == ["token_id", "id"]

    conn = psycopg2.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("""
        CREATE TABLE probe (id bigserial PRIMARY KEY, token_id text NOT NULL, ts timestamptz NOT NULL,
                            UNIQUE (token_id, ts));
        CREATE UNIQUE INDEX probe_lower ON probe (lower(token_id), ts);
        CREATE UNIQUE INDEX probe_covering ON probe (ts) INCLUDE (token_id);
        ALTER TABLE probe ADD CONSTRAINT probe_excl EXCLUDE USING gist (tstzrange(ts, ts, '[]') WITH &&)""")
    conn.close()
    assert without(pg_dsn, "probe") == ["probe_covering", "probe_excl", "probe_lower", "probe_pkey"]
    assert unique_keys(pg_dsn, "probe")["probe_token_id_ts_key"] == ["token_id", "ts"]
