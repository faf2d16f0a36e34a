-- 0020_trades_feed: what the trade listener needs besides trades and feed_gaps.

-- feed_coverage: per token, the time up to which every live trade the listener
-- received is durable (committed, or in the fsynced spool). The listener advances
-- it only for tokens subscribed on a healthy socket, right after a Writer flush.
-- A restarted listener (kill -9, crash, reboot) takes its first gap for a token
-- from here: [covered_until, time of the new subscription]. Without it, a quiet
-- token would be backfilled from its last trade, which may be days old.
-- Key: token_id; one coverage mark per token, only ever moved forward.
CREATE TABLE feed_coverage (
    token_id      text PRIMARY KEY,
    covered_until timestamptz NOT NULL,
    shard         text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- market_events: the market channel's global announcements (custom features):
-- `new_market` and `market_resolved`, stored once however many sockets and
-- shards deliver them (each socket gets every one). The markets and resolutions
-- collectors may read them as early hints; they stay authoritative themselves
-- (a WS `market_resolved` is not the UMA-final state the resolutions table holds).
-- Key: (kind, market_id): the exchange announces each market's creation and
-- resolution once; a later copy is the same announcement again.
CREATE TABLE market_events (
    kind             text NOT NULL CHECK (kind IN ('new_market', 'market_resolved')),
    market_id        text NOT NULL,
    condition_id     text,
    token_ids        jsonb,
    winning_token_id text,
    winning_outcome  text,
    ts               timestamptz,
    raw              jsonb,
    received_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, market_id)
);
CREATE INDEX market_events_condition_idx ON market_events (condition_id);
