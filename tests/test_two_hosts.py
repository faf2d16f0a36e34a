"""Two collectord instances, one database, nothing lost (issue 16).

Two real daemons (`python -m collectord -c A start` and `-c B start`: their own config,
data_dir, PID file and log) against one PostgreSQL schema and one polysim, both
running. A holds every polling lease, B stands by. Then (tests/faults/hosts.py `run`):
kill -9 of A's supervisor and every collector of it at once, A kept down 40 s (longer
than the 30 s takeover window), A started again; a graceful stop + start of B (an
upgrade). Afterwards:
  - trades, against polysim's ledger for the followed tokens: missing 0, duplicated 0
    (both instances listen to every token: either one alone records everything);
  - polling taken over within 30 s, measured from the rows (the gap between the old
    holder's last prices cycle and the new holder's first) and from status.json;
  - no doubled snapshots: both instances never poll at once, measured from the rows
    (tests/faults/hosts.py `snapshot_figures`: cycles closer than interval/2 come only
    from a takeover, at most one each);
  - no gap owed at the end: the restart gaps (whose backfill finds the trades the other
    instance stored) ended recovered.
The figures are printed (pytest -s) and written to accounting.txt in the test's tmp dir.
"""

from __future__ import annotations

from tests.faults import accounting, hosts

DOWN = 40.0  # > the 30 s takeover window
PRICES = 2.0  # seconds between prices cycles (orderbooks: twice that)


def test_two_hosts_kill_and_upgrade_lose_nothing_and_double_nothing(tmp_path, pg_dsn, polysim):
    sim = polysim(markets=10, seed=16, trade_rate=60.0)
    # Prices every 2 s: a cycle's time carries the followed-set query and the lease check before
    # it, whose latency on a loaded machine must stay far below interval/2 for the check below.
    figures = hosts.run(tmp_path, pg_dsn, sim, down=DOWN, warm=6.0, between=4.0, settle=30.0,
                        prices_interval=PRICES)
    print("\n" + accounting.table(figures, "two hosts"))
    accounting.write(figures, tmp_path / "accounting.txt", "two hosts")

    assert figures["published_followed"] > 500, figures  # enough trades to mean something
    assert figures["missing"] == 0, figures["missing_examples"]
    assert figures["duplicated"] == 0, figures["duplicated_rows"]
    assert figures["gaps_owed"] == 0 and figures["gaps_unrecoverable"] == 0, figures
    # A standby heartbeats: the watchdog (10 s here) never took one for hung, nothing restarted.
    assert figures["restarts"] == 0 and figures["watchdog_kills"] == 0, figures

    # Takeover within 30 s, from the rows and from the instances' own reports.
    for key in ("takeover_kill_rows_s", "takeover_stop_rows_s", "takeover_kill_status_max_s",
                "takeover_stop_status_max_s"):
        assert figures[key] is not None and figures[key] <= 30.0, (key, figures[key])

    # Never both polling: a close pair of cycles only at a takeover (2 here), none doubled
    # over a stretch (that would give one per cycle: ~DOWN / interval of them).
    assert figures["prices_close_cycles"] <= figures["takeovers"], figures
    assert figures["prices_close_pairs"] <= figures["takeovers"], figures
    assert figures["books_close_pairs"] <= figures["takeovers"], figures
    assert figures["prices_cycles"] >= DOWN / PRICES and figures["books_snapshots"] > 0, figures


def test_the_doubled_snapshot_measure_sees_two_pollers(pg_dsn):
    """The check above can fail: rows as two instances polling at once would leave them
    (cycles 1 s apart from each, 0.3 s out of phase, for 20 s) give a close pair per
    cycle; one holder with one takeover 0.2 s after its last cycle gives one."""
    import psycopg2

    from workers.storage import migrate

    migrate(pg_dsn)
    conn = psycopg2.connect(pg_dsn)
    from datetime import date

    from workers.storage import partitions

    for table in ("price_snapshots", "orderbook_snapshots"):  # raw INSERTs below: their day's partition
        partitions.create(conn, table, [date(2001, 9, 9)])
    with conn, conn.cursor() as cur:
        for token in ("1", "2"):
            cur.execute("INSERT INTO price_snapshots (token_id, ts) SELECT %s, to_timestamp(1e9 + g)"
                        " FROM generate_series(0, 19) g", (token,))
            cur.execute("INSERT INTO price_snapshots (token_id, ts) SELECT %s, to_timestamp(1e9 + g + 0.3)"
                        " FROM generate_series(0, 19) g", (token,))
            cur.execute("INSERT INTO orderbook_snapshots (token_id, ts, hash, received_at) SELECT %s,"
                        " to_timestamp(1e9 + g), h, to_timestamp(1e9 + g + 0.1 * (h = 'b')::int)"
                        " FROM generate_series(0, 19, 2) g, unnest(array['a', 'b']) h", (token,))
    doubled = hosts.snapshot_figures(pg_dsn, 1.0, 2.0)
    assert doubled["prices_close_cycles"] == 20 and doubled["prices_close_pairs"] == 20, doubled
    assert doubled["books_close_pairs"] == 10, doubled
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM price_snapshots WHERE extract(epoch FROM ts) - floor(extract(epoch FROM ts)) > 0"
                    " AND ts <> to_timestamp(1e9 + 10.3)")  # one holder; the takeover at 10.3
        cur.execute("DELETE FROM orderbook_snapshots WHERE hash = 'b'")
    conn.close()
    single = hosts.snapshot_figures(pg_dsn, 1.0, 2.0)
    assert single["prices_close_cycles"] == 1 and single["prices_close_pairs"] == 1, single
    assert single["books_close_pairs"] == 0, single
    assert hosts.takeover_from_rows(hosts.cycles(pg_dsn), 1e9 + 10.1) == 0.3
