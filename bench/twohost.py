"""Two collectord instances on one database: kill -9 of one for minutes, an upgrade of the other.

    python -m bench twohost --minutes 5 --down 150            # the note's run (issue 16)
    python -m bench twohost --quick                           # ~1 min, the test suite's
    python -m bench twohost --minutes 2 --down 40 --no-lease  # both poll: what doubling looks like

One run, in order (tests/faults/hosts.py `run`, the scenario tests/test_two_hosts.py
asserts on): polysim (`--markets`, `--trade-rate`) on a free loopback port; a fresh
schema in `--dsn` (default $COLLECTORD_TEST_DSN); two real daemons A and B
(`python -m collectord -c CONF start`, each with its own config, data_dir, PID file,
log), A first so it holds every polling lease; a warm-up; kill -9 of A's supervisor
and every collector of it at once, A kept down `--down` seconds, then started again
(standby now); a stretch with both up; a graceful stop + start of B (an upgrade: A takes
over); a stretch with both up; settle (every gap backfilled); stop both. Then the
figures: trades published / stored / missing / duplicated against polysim's ledger for
the followed tokens, gaps, the takeover times (from the rows: the gap between the old
holder's last prices cycle and the new one's first; and from status.json), and the
doubled-snapshot figures (cycles closer than interval/2: one per takeover at most when
one instance polls at a time). A benchmark: it asserts nothing, it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.soak import DEFAULT_DSN, ledger_pages, start_polysim  # noqa: E402
from tests.conftest import with_schema  # noqa: E402
from tests.faults import accounting, hosts  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench twohost", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="whole run, roughly (the phases share it)")
    p.add_argument("--down", type=float, default=150.0, help="seconds A stays down after its kill -9")
    p.add_argument("--rate", "--trade-rate", dest="rate", type=float, default=100.0, help="trades/s polysim publishes")
    p.add_argument("--markets", type=int, default=20)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--no-lease", action="store_true", help="both instances poll (lease = no): the doubling shows")
    p.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", DEFAULT_DSN))
    p.add_argument("--keep", action="store_true", help="keep the run directory and the schema")
    p.add_argument("--quick", action="store_true", help="~1 min: 10 s down, 6 markets at 30 trades/s "
                   "(defaults only: flags given still win)")
    if "--quick" in argv:
        p.set_defaults(minutes=0.6, down=10.0, rate=30.0, markets=6)
    args = p.parse_args(argv)
    warm = min(30.0, max(3.0, args.minutes * 6))
    between = max(3.0, (args.minutes * 60 - warm - args.down) / 2)

    base = Path(tempfile.mkdtemp(prefix="collectord-twohost-"))
    schema = "twohost_" + uuid.uuid4().hex[:10]
    admin = psycopg2.connect(args.dsn, connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    dsn = with_schema(args.dsn, schema)
    args.rate = float(args.rate)
    sim = start_polysim(args)
    command = "python -m bench twohost " + " ".join(argv)
    print(f"twohost: {args.minutes:g} min, A down {args.down:g} s after kill -9, {args.rate:g} trades/s over "
          f"{args.markets} markets, {args.shards} trade shards per instance{', NO lease' if args.no_lease else ''};"
          f" run dir {base}, schema {schema}", flush=True)
    began = time.monotonic()
    try:
        figures = hosts.run(base, dsn, sim, down=args.down, warm=warm, between=between, shards=args.shards,
                            settle=120.0, lease=not args.no_lease, ledger=lambda: ledger_pages(sim),
                            log=lambda text: print(f"  {time.monotonic() - began:6.1f}s {text}", flush=True))
    finally:
        sim.stop()
        if not args.keep:
            with admin.cursor() as cur:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            shutil.rmtree(base, ignore_errors=True)
        admin.close()
    figures["seconds"] = round(time.monotonic() - began, 1)
    figures["command"] = command
    print(accounting.table(figures, "two hosts"))
    print(json.dumps({k: v for k, v in figures.items() if not k.endswith(("_keys",))}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
