-- 0021_gap_owner: every open feed gap has an owner, and ends recovered or with a reason.
--
-- condition_id: the gap's market. A listener owns the gaps whose market hashes to
-- its shard (workers.trades.shard_of), whether or not anyone still follows the
-- token, so the market must be known from the gap row itself: a token that left
-- the followed set is no longer in followed_tokens, and `tokens` may not list it.
-- Rows written before this migration take it from followed_tokens or tokens;
-- only the open ones are filled in (they are the ones a listener will look for;
-- a recovered gap is history, and rewriting all of them would be the cost of a
-- full-table update on a table that grows with every reconnect).
--
-- unrecoverable: why a gap will never be recovered (the Data API refuses its
-- market for good, no market is known for it). Set instead of recovered_at: the
-- gap is closed with that reason, counted, and no listener retries it.
--
-- A gap is open (owed) while recovered_at IS NULL AND unrecoverable IS NULL.
--
-- feed_coverage.condition_id, released_at: a token that leaves the followed set
-- still owes what lies after its coverage mark (trades published before it was
-- dropped that no socket delivered: the last moments before a stop or a kill -9).
-- The listener owning its market records that as a gap [covered_until, now] and
-- then sets released_at (and covered_until to the gap's end): released marks are
-- settled. A live mark clears released_at again. Marks of tokens not followed at
-- this upgrade start released: whatever they owe predates this migration, and
-- backfilling months of closed markets at upgrade is not what anyone wants.

ALTER TABLE feed_gaps ADD COLUMN condition_id text;
ALTER TABLE feed_gaps ADD COLUMN unrecoverable text;

UPDATE feed_gaps g SET condition_id = f.condition_id
  FROM followed_tokens f
 WHERE g.recovered_at IS NULL AND g.condition_id IS NULL
   AND f.token_id = g.token_id AND f.condition_id IS NOT NULL;
UPDATE feed_gaps g SET condition_id = t.condition_id
  FROM tokens t
 WHERE g.recovered_at IS NULL AND g.condition_id IS NULL
   AND t.token_id = g.token_id AND t.condition_id IS NOT NULL;

ALTER TABLE feed_coverage ADD COLUMN condition_id text;
ALTER TABLE feed_coverage ADD COLUMN released_at timestamptz;
UPDATE feed_coverage c SET condition_id = f.condition_id
  FROM followed_tokens f WHERE f.token_id = c.token_id AND f.condition_id IS NOT NULL;
UPDATE feed_coverage c SET condition_id = t.condition_id
  FROM tokens t WHERE c.condition_id IS NULL AND t.token_id = c.token_id AND t.condition_id IS NOT NULL;
UPDATE feed_coverage c SET released_at = now()
 WHERE NOT EXISTS (SELECT 1 FROM followed_tokens f WHERE f.token_id = c.token_id);

-- what every listener reads at start and on each refresh: the open gaps
DROP INDEX IF EXISTS feed_gaps_unrecovered_idx;
CREATE INDEX feed_gaps_open_idx ON feed_gaps (started_at) WHERE recovered_at IS NULL AND unrecoverable IS NULL;
