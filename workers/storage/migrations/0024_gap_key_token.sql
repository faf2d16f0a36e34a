-- 0024_gap_key_token: feed_gaps' primary key includes token_id.
--
-- Every unique key of a per-token table includes token_id (docs/scaling.md): that is
-- what lets the table be distributed by token_id (Citus create_distributed_table
-- refuses a unique constraint without the distribution column: a shard could not
-- enforce it alone). feed_gaps had a serial `id` as its primary key; nothing reads
-- it (rows are found and merged by their natural key (token_id, started_at)), but
-- operators may, so the column and its sequence stay, now as the key (token_id, id):
-- still unique (the sequence never repeats), still what a WHERE id = ... uses
-- (with the token), and distributable. tests/test_scaling.py checks every such key.
ALTER TABLE feed_gaps DROP CONSTRAINT feed_gaps_pkey;
ALTER TABLE feed_gaps ADD CONSTRAINT feed_gaps_pkey PRIMARY KEY (token_id, id);
