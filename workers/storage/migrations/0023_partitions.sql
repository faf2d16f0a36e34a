-- 0023_partitions: trades, price_snapshots and orderbook_snapshots become range-
-- partitioned by day (PostgreSQL declarative partitioning), so retention drops whole
-- partitions (workers/storage/partitions.py) and no table grows without bound.
--
-- Partitions: one per UTC day, named <table>_pYYYYMMDD; each child index is named
-- after its parent's index plus the same suffix (trades_key_p20261203). The
-- collectors create partitions ahead of time, and the Writer creates any partition a
-- batch needs that is missing (a row far in the past or future is stored, never
-- refused). No DEFAULT partition: see partitions.py.
--
-- The partition column must be in every unique key. For the snapshots it is their own
-- `ts`, already in their keys. The trades key deliberately has no ts (live trades carry
-- milliseconds, Data API backfill rows whole seconds), so trades get a column of their
-- own: trade_day, the UTC day of the trade's exchange time. Both sources compute it
-- identically for the same trade, under the assumption that the Data API's second is
-- the WebSocket millisecond truncated (polysim: `ts_ms // 1000`; polymarket-api.md
-- §4.3: time compared at 1-second resolution): day boundaries are whole seconds, so
-- ms and floor(ms / 1000) always fall on the same day. Should the assumption fail by
-- a few seconds (rounding, a settlement delay), only a trade within a minute of
-- midnight could get another day; the Writer guards exactly those rows (tables.py:
-- they skip the direct COPY and their insert checks the neighbouring day's partition).
--
-- The key becomes (token_id, tx_hash, price, size, side, ordinal, trade_day); without
-- a tx_hash, (token_id, ts, price, size, side, ordinal, trade_day), where trade_day is
-- a function of ts and changes nothing.
--
-- Conversion of a populated database, per table, inside this migration's one
-- transaction: free the old index names, rename the table to <table>_unpartitioned,
-- create the partitioned table, one partition per day present in the data and for
-- today and the 3 days after, copy every row with one INSERT ... SELECT (no row lost,
-- none duplicated: the old keys were stricter than the new ones), build the indexes
-- after the copy (faster than maintaining them row by row), name the child indexes,
-- drop the old table. Measured: `python -m bench storage --migrate-rows 1000000`.
-- The tables are locked (ACCESS EXCLUSIVE) until it commits: stop the collectors, or
-- let `collectord start` run it before it forks them. The copy of a big table can take
-- longer than migrate.py's 600 s statement timeout, which therefore does not apply here.

SET LOCAL statement_timeout = 0;

DO $migration$
DECLARE
    spec record;
    d date;
    idx record;
BEGIN
    -- time-partitioned tables: (name, partition column, expression of the day from an old row)
    FOR spec IN
        SELECT * FROM (VALUES
            ('trades', 'trade_day', 'date'),
            ('price_snapshots', 'ts', 'timestamptz'),
            ('orderbook_snapshots', 'ts', 'timestamptz')
        ) AS t(name, col, kind)
    LOOP
        -- 1. the old table steps aside, its index and constraint names freed
        FOR idx IN
            SELECT c.relname, con.conname
              FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
              LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid AND con.contype IN ('p', 'u')
             WHERE x.indrelid = to_regclass(spec.name)
        LOOP
            IF idx.conname IS NOT NULL THEN
                EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', spec.name, idx.conname);
            ELSE
                EXECUTE format('DROP INDEX %I', idx.relname);
            END IF;
        END LOOP;
        EXECUTE format('ALTER TABLE %I RENAME TO %I', spec.name, spec.name || '_unpartitioned');
    END LOOP;
END
$migration$;

-- 2. the partitioned tables (columns as in 0001, plus trades.trade_day)
CREATE TABLE trades (
    token_id     text NOT NULL,
    condition_id text,
    ts           timestamptz NOT NULL,   -- exchange time (ms for ws, s for backfill)
    price        numeric NOT NULL,
    size         numeric NOT NULL,
    side         text NOT NULL CHECK (side IN ('BUY', 'SELL')),  -- the taker's side
    tx_hash      text,
    ordinal      int NOT NULL DEFAULT 0,
    fee_rate_bps numeric,
    source       text NOT NULL CHECK (source IN ('ws', 'backfill')),
    received_at  timestamptz,
    trade_day    date NOT NULL           -- UTC day of ts: the partition column (see above)
) PARTITION BY RANGE (trade_day);

CREATE TABLE price_snapshots (
    token_id         text NOT NULL,
    ts               timestamptz NOT NULL,
    condition_id     text,
    best_bid         numeric,
    best_ask         numeric,
    mid              numeric,
    last_trade_price numeric,
    received_at      timestamptz
) PARTITION BY RANGE (ts);

CREATE TABLE orderbook_snapshots (
    token_id     text NOT NULL,
    condition_id text,
    ts           timestamptz NOT NULL,
    hash         text NOT NULL DEFAULT '',
    best_bid     numeric,
    best_ask     numeric,
    spread       numeric,
    bid_depth    numeric,
    ask_depth    numeric,
    bid_levels   int,
    ask_levels   int,
    bids         jsonb,
    asks         jsonb,
    received_at  timestamptz
) PARTITION BY RANGE (ts);

-- 3. one partition per day the data holds, and today plus 3 days ahead
DO $migration$
DECLARE
    spec record;
    d date;
BEGIN
    FOR spec IN
        SELECT * FROM (VALUES ('trades', 'date'), ('price_snapshots', 'timestamptz'),
                              ('orderbook_snapshots', 'timestamptz')) AS t(name, kind)
    LOOP
        FOR d IN
            EXECUTE format('SELECT DISTINCT (ts AT TIME ZONE ''UTC'')::date FROM %I'
                           ' UNION SELECT (now() AT TIME ZONE ''UTC'')::date + i FROM generate_series(0, 3) AS i',
                           spec.name || '_unpartitioned')
        LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                           spec.name || '_p' || to_char(d, 'YYYYMMDD'), spec.name,
                           CASE WHEN spec.kind = 'date' THEN d::text ELSE d::text || ' 00:00:00+00' END,
                           CASE WHEN spec.kind = 'date' THEN (d + 1)::text ELSE (d + 1)::text || ' 00:00:00+00' END);
            IF spec.kind = 'date' THEN
                -- a trades partition's rows have their ts in its day: a constant ts range
                -- then reads only its days' partitions (constraint exclusion)
                EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (ts >= %L AND ts < %L)',
                               spec.name || '_p' || to_char(d, 'YYYYMMDD'),
                               spec.name || '_p' || to_char(d, 'YYYYMMDD') || '_ts_day',
                               d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00');
            END IF;
        END LOOP;
    END LOOP;
END
$migration$;

-- 4. every row, once
INSERT INTO trades (token_id, condition_id, ts, price, size, side, tx_hash, ordinal, fee_rate_bps, source,
                    received_at, trade_day)
SELECT token_id, condition_id, ts, price, size, side, tx_hash, ordinal, fee_rate_bps, source, received_at,
       (ts AT TIME ZONE 'UTC')::date
  FROM trades_unpartitioned;
INSERT INTO price_snapshots SELECT * FROM price_snapshots_unpartitioned;
INSERT INTO orderbook_snapshots SELECT * FROM orderbook_snapshots_unpartitioned;

-- 5. keys and indexes (the documentation of each is in 0001; the keys now carry the
--    partition column)
CREATE UNIQUE INDEX trades_key ON trades (token_id, tx_hash, price, size, side, ordinal, trade_day)
    WHERE tx_hash IS NOT NULL;
CREATE UNIQUE INDEX trades_key_no_tx ON trades (token_id, ts, price, size, side, ordinal, trade_day)
    WHERE tx_hash IS NULL;
CREATE INDEX trades_token_ts_idx ON trades (token_id, ts);
CREATE INDEX trades_ts_brin ON trades USING brin (ts);
ALTER TABLE price_snapshots ADD CONSTRAINT price_snapshots_pkey PRIMARY KEY (token_id, ts);
CREATE INDEX price_snapshots_ts_brin ON price_snapshots USING brin (ts);
ALTER TABLE orderbook_snapshots ADD CONSTRAINT orderbook_snapshots_pkey PRIMARY KEY (token_id, ts, hash);
CREATE INDEX orderbook_snapshots_ts_brin ON orderbook_snapshots USING brin (ts);

-- 6. child indexes named after their parent's; the old tables go
DO $migration$
DECLARE
    idx record;
BEGIN
    FOR idx IN
        SELECT c.relname AS child, p.relname AS parent, substring(t.relname FROM '_p[0-9]{8}$') AS suffix
          FROM pg_inherits i
          JOIN pg_class c ON c.oid = i.inhrelid
          JOIN pg_class p ON p.oid = i.inhparent
          JOIN pg_index x ON x.indexrelid = c.oid
          JOIN pg_class t ON t.oid = x.indrelid
         WHERE p.relkind = 'I' AND x.indrelid IN (
               SELECT inhrelid FROM pg_inherits WHERE inhparent IN
                   (to_regclass('trades'), to_regclass('price_snapshots'), to_regclass('orderbook_snapshots')))
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.child, left(idx.parent || idx.suffix, 63));
    END LOOP;
END
$migration$;

DROP TABLE trades_unpartitioned;
DROP TABLE price_snapshots_unpartitioned;
DROP TABLE orderbook_snapshots_unpartitioned;
