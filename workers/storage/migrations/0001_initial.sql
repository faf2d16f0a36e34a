-- 0001_initial: the collectord tables (names and columns are contract: DESIGN.md §6).
--
-- Conventions, and why:
--   * Every id is text. Token ids are unsigned 256-bit integers written as up to
--     78 decimal digits: they fit neither bigint nor float, and text round-trips
--     them exactly (and compares them exactly in the unique keys below).
--   * Prices, sizes, volumes are numeric: exact decimals, so '0.48' and '0.480'
--     are equal in every key and comparison, and 0.982 never becomes 0.98199999.
--   * Times are timestamptz. `ts` is the exchange's time; `received_at` is when
--     the collector got the data (live feeds), so lag is measurable.
--   * Every table has a natural unique key, so every write is
--     INSERT ... ON CONFLICT: a replayed spool batch, a restarted worker or a
--     backfill overlapping live data never creates a duplicate row.
--   * Tables live in the connection's current schema (no schema prefix here).

-- markets: one row per Gamma market, open and closed.
-- Key: market_id, Gamma's id, which Gamma assigns once per market and never reuses.
-- Upsert rewrites the row when the payload (raw) changed, keeps first_seen_at.
CREATE TABLE markets (
    market_id             text PRIMARY KEY,
    condition_id          text,
    question_id           text,
    slug                  text,
    question              text,
    event_id              text,
    neg_risk_market_id    text,
    active                boolean,
    closed                boolean,
    archived              boolean,
    neg_risk              boolean,
    start_date            timestamptz,
    end_date              timestamptz,
    closed_time           timestamptz,
    volume                numeric,
    volume_24h            numeric,
    liquidity             numeric,
    outcomes              jsonb,          -- ["Yes","No"], in token (outcome_index) order
    tags                  jsonb,
    uma_resolution_status text,
    created_at            timestamptz,
    updated_at            timestamptz,    -- Gamma's updatedAt
    raw                   jsonb,          -- the whole Gamma object, so parsers can be re-run
    first_seen_at         timestamptz NOT NULL DEFAULT now(),
    last_seen_at          timestamptz NOT NULL DEFAULT now()
);
-- a market's history by its condition id (the id CLOB, WS and Data API use)
CREATE INDEX markets_condition_id_idx ON markets (condition_id);
CREATE INDEX markets_slug_idx ON markets (slug);
CREATE INDEX markets_event_id_idx ON markets (event_id);

-- tokens: one row per outcome token.
-- Key: token_id; the exchange mints exactly one token per outcome of one market.
CREATE TABLE tokens (
    token_id      text PRIMARY KEY,
    market_id     text,
    condition_id  text,
    outcome       text,
    outcome_index int                 -- from 0, in the order of markets.outcomes
);
CREATE INDEX tokens_market_id_idx ON tokens (market_id);
CREATE INDEX tokens_condition_id_idx ON tokens (condition_id);

-- followed_tokens: the set the markets collector chose from [selection]; the
-- price, book and trade collectors read it (no IPC between collectors).
-- Key: token_id; a token is either followed or not. `since` keeps the first time.
CREATE TABLE followed_tokens (
    token_id      text PRIMARY KEY,
    market_id     text,
    condition_id  text,
    outcome       text,
    since         timestamptz NOT NULL DEFAULT now()
);

-- price_snapshots: best bid/ask, mid and last trade price per token, polled.
-- Key: (token_id, ts): one token has one price state at one instant; a
-- re-polled or replayed snapshot of the same instant is the same snapshot.
-- The key's index also serves "a token over a time range" and "latest per token"
-- (ORDER BY ts DESC LIMIT 1, or DISTINCT ON (token_id) ... ORDER BY token_id, ts DESC).
CREATE TABLE price_snapshots (
    token_id         text NOT NULL,
    ts               timestamptz NOT NULL,
    condition_id     text,
    best_bid         numeric,
    best_ask         numeric,
    mid              numeric,
    last_trade_price numeric,
    received_at      timestamptz,
    PRIMARY KEY (token_id, ts)
);
-- whole-table time ranges (all tokens); BRIN: tiny and cheap on append-mostly data
CREATE INDEX price_snapshots_ts_brin ON price_snapshots USING brin (ts);

-- orderbook_snapshots: one full book per token per poll.
-- bids/asks: jsonb arrays of [price, size] decimal strings, BEST level first;
-- best_bid/best_ask/spread/depth are extracted so users never parse strings.
-- Key: (token_id, ts, hash): the exchange's book hash identifies the book
-- content at that timestamp, so the same book fetched twice lands once while
-- two different books reported with the same timestamp are both kept.
-- A book without a hash is stored with hash '' (the key needs a value).
CREATE TABLE orderbook_snapshots (
    token_id     text NOT NULL,
    condition_id text,
    ts           timestamptz NOT NULL,
    hash         text NOT NULL DEFAULT '',
    best_bid     numeric,             -- NULL when the bid side is empty
    best_ask     numeric,             -- NULL when the ask side is empty
    spread       numeric,
    bid_depth    numeric,             -- sum of sizes over all bid levels
    ask_depth    numeric,
    bid_levels   int,
    ask_levels   int,
    bids         jsonb,
    asks         jsonb,
    received_at  timestamptz,
    PRIMARY KEY (token_id, ts, hash)
);
-- The key's index serves a token's books over a time range and its latest book;
-- a market's books go through its two tokens (as for trades below).
CREATE INDEX orderbook_snapshots_ts_brin ON orderbook_snapshots USING brin (ts);

-- trades: every fill the exchange published (WebSocket last_trade_price, or
-- Data API backfill).
-- Trades have no exchange id, and two fills of one transaction can be identical
-- in every field. Key: (token_id, tx_hash, price, size, side, ordinal), where
-- ordinal numbers exact repeats within one transaction in arrival order (0 for
-- the first). `ts` stays out of the key because the WebSocket reports
-- milliseconds and the Data API seconds: a live trade and its backfilled twin
-- (prices rounded to the tick, sizes to 6 decimals; numeric makes 0.48 = 0.480)
-- have equal keys and land once.
-- A trade without tx_hash (old recordings) keys on its millisecond ts instead:
-- (token_id, ts, price, size, side, ordinal). Two partial unique indexes carry
-- the two keys; writers use ON CONFLICT DO NOTHING without a target, which
-- honours every unique index.
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
    received_at  timestamptz
);
CREATE UNIQUE INDEX trades_key ON trades (token_id, tx_hash, price, size, side, ordinal)
    WHERE tx_hash IS NOT NULL;
CREATE UNIQUE INDEX trades_key_no_tx ON trades (token_id, ts, price, size, side, ordinal)
    WHERE tx_hash IS NULL;
-- A token's trades over a time range. A market's trades go through its tokens:
--   WHERE token_id IN (SELECT token_id FROM tokens WHERE condition_id = $1) AND ts >= ...
-- (two index ranges). No (condition_id, ts) index: trades is the hottest table and
-- each index costs every insert (measured: a fourth btree cut the batched rate ~25%).
CREATE INDEX trades_token_ts_idx ON trades (token_id, ts);
-- whole-table time ranges (all tokens); BRIN: tiny and nearly free to maintain
CREATE INDEX trades_ts_brin ON trades USING brin (ts);

-- resolutions: how a market resolved (or was voided).
-- Key: market_id; a market has one resolution. Upsert rewrites it when the
-- exchange corrects itself (different winner, payouts or status).
CREATE TABLE resolutions (
    market_id        text PRIMARY KEY,
    condition_id     text,
    winning_token_id text,
    winning_outcome  text,            -- the outcome's name: "Yes", "Over", a player's name
    payouts          jsonb,           -- payout vector, in outcome order
    status           text,            -- 'resolved' | 'void' | ...
    resolved_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),  -- when this row last changed
    first_seen_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX resolutions_condition_id_idx ON resolutions (condition_id);

-- feed_gaps: every interval in which a feed may have missed trades, and how it
-- was recovered (backfill) or not.
-- Key: (token_id, started_at): one token's feed stops at one instant once;
-- re-recording the same gap (a replayed batch) updates it instead of adding one.
CREATE TABLE feed_gaps (
    id               bigserial PRIMARY KEY,
    token_id         text NOT NULL,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    reason           text,
    recovered_at     timestamptz,
    recovered_trades int,
    shard            text,
    UNIQUE (token_id, started_at)
);
-- open gaps (ended_at or recovered_at NULL) are what the backfiller looks for
CREATE INDEX feed_gaps_unrecovered_idx ON feed_gaps (started_at) WHERE recovered_at IS NULL;
