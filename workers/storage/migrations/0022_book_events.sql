-- 0022_book_events: every book event of the followed tokens, from the market channel
-- (the trade listener with `books = true` writes them; workers/bookevents.py).
--
-- One row per token and message:
--   kind 'b'  a `book`: a checkpoint; bids and asks hold every level;
--   kind 'p'  a `price_change`: the levels of this token it sets, new absolute sizes
--             (0 deletes the level); a side it does not touch is NULL;
--   kind 't'  a `tick_size_change`: tick_size only;
--   kind 'x'  an event the listener refused (a level that is not one): no levels; the
--             token's book may be wrong from there to the next checkpoint.
-- bids / asks: 2-D numeric arrays of [price, size]; a book's best level first (bids
-- descending, asks ascending), a price_change's in the message's order.
-- ts: the exchange's timestamp (ms). hash: the exchange's 40-hex SHA-1 as 20 bytes
-- (the hash of the REST summary of the book after the event, polymarket-api.md §3.1);
-- a message without one is keyed by the SHA-1 of its content.
-- tick_size / last_trade_price: as an initial `book` carries them (NULL otherwise).
-- received_at: when the listener read it, strictly increasing within one listener
-- process, so events of one token stamped with the same millisecond keep their order.
--
-- Key: (token_id, ts, kind, hash). The exchange re-sends an update with the same hash
-- (de-duplicated here), and both tokens' changes come on every socket subscribed to
-- either (stored once). ts is in the key so the table can become range partitions by
-- time like trades (migration 0023). A book at T is rebuilt from the last 'b' at or
-- before T plus the 'p' rows after it (workers/storage/replay.py): hence the partial
-- index on checkpoints.
CREATE TABLE book_events (
    token_id         text NOT NULL,
    ts               timestamptz NOT NULL,
    kind             "char" NOT NULL CHECK (kind IN ('b', 'p', 't', 'x')),
    hash             bytea NOT NULL,
    bids             numeric[],
    asks             numeric[],
    tick_size        numeric,
    last_trade_price numeric,
    received_at      timestamptz NOT NULL,
    PRIMARY KEY (token_id, ts, kind, hash)
);
CREATE INDEX book_events_checkpoint_idx ON book_events (token_id, ts) WHERE kind = 'b';
