-- 0025_book_events_partitions: book_events (0022) becomes range-partitioned by UTC day
-- on its own ts, like the snapshots in 0023, so the largest table a listener with
-- `books = yes` writes (~900 bytes a book event) is retained by whole partitions too
-- ([collector:trades] retention applies to trades and book_events). Its key
-- (token_id, ts, kind, hash) already holds the partition column. Partitions, their
-- names and who creates them: workers/storage/partitions.py and 0023. A populated
-- table is converted in this one transaction: every row copied once.

SET LOCAL statement_timeout = 0;

ALTER TABLE book_events DROP CONSTRAINT book_events_pkey;
DROP INDEX book_events_checkpoint_idx;
ALTER TABLE book_events RENAME TO book_events_unpartitioned;

CREATE TABLE book_events (
    token_id         text NOT NULL,
    ts               timestamptz NOT NULL,
    kind             "char" NOT NULL CHECK (kind IN ('b', 'p', 't', 'x')),
    hash             bytea NOT NULL,
    bids             numeric[],
    asks             numeric[],
    tick_size        numeric,
    last_trade_price numeric,
    received_at      timestamptz NOT NULL
) PARTITION BY RANGE (ts);

DO $migration$
DECLARE
    d date;
BEGIN
    FOR d IN
        SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM book_events_unpartitioned
        UNION SELECT (now() AT TIME ZONE 'UTC')::date + i FROM generate_series(0, 3) AS i
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF book_events FOR VALUES FROM (%L) TO (%L)',
                       'book_events_p' || to_char(d, 'YYYYMMDD'), d::text || ' 00:00:00+00',
                       (d + 1)::text || ' 00:00:00+00');
    END LOOP;
END
$migration$;

INSERT INTO book_events SELECT * FROM book_events_unpartitioned;

ALTER TABLE book_events ADD CONSTRAINT book_events_pkey PRIMARY KEY (token_id, ts, kind, hash);
CREATE INDEX book_events_checkpoint_idx ON book_events (token_id, ts) WHERE kind = 'b';

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
         WHERE p.relkind = 'I' AND x.indrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass('book_events'))
    LOOP
        EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.child, left(idx.parent || idx.suffix, 63));
    END LOOP;
END
$migration$;

DROP TABLE book_events_unpartitioned;
