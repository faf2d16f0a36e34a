"""Soak: the whole system for N minutes at R trades/s with faults every few seconds.

    python -m bench soak --minutes 30 --rate 2000            # mixed faults
    python -m bench soak --minutes 10 --rate 200 --s25       # S25: process chaos only
    python -m bench soak --quick                             # 12 s at 200/s, 10 markets (the test suite's)

One run, in order:
  1. polysim (`--markets`, `--rate` trades/s) on a free loopback port; a fresh schema
     in `--dsn` (default $COLLECTORD_TEST_DSN), reached through a loopback proxy (so the
     database can "go away" without stopping the shared server);
  2. the real supervisor (`python -m collectord -c CONF start --foreground`) with all
     five collectors (`--shards` trade shards), delays scaled down (tests/faults/system.py);
  3. faults every `--every-min`..`--every-max` s, drawn from: kill -9 of a child,
     SIGSTOP+SIGCONT, SIGSTOP until the watchdog kills it, polysim exchange faults
     (429/5xx/slow/truncated/malformed/cut/extra fields/WS drop/stall/PONG withheld/
     unknown events/huge frames), pg_terminate_backend of our connections, a database
     outage (5-15 s; and one of 60 s in runs of 10 minutes or more), rows written first
     by someone else, and (at most every 2 minutes) kill -9 of the supervisor and a
     fresh start. With --s25: only kill -9 / SIGSTOP+SIGCONT every 0.5-3 s (scenario S25).
     From `--spare-from` minutes on, the `--spare` processes (witnesses: by default one
     of each collector kind) are no longer picked for process faults and the supervisor
     is no longer killed, so one incarnation of each kind lives long enough to show its
     memory; every other fault still reaches them, and the other trade shards keep being
     killed. `--spare ''` spares nothing (every process killed all run long);
  4. every `--sample` s: RSS of the supervisor and of every child; after the run the
     least-squares slope per process after `--warmup` minutes, over the longest-lived
     pid of each name (a killed child's successor starts with a fresh heap). A trade
     shard remembers each transaction's repeat counts for 2-4 minutes (workers/trades.py
     Ordinals), so its RSS grows for the first minutes of an incarnation;
  5. faults stop, the system settles (gaps recovered, spool empty), SIGTERM, then the
     accounting against polysim's ledger (tests/faults/accounting.py): missing,
     duplicated, orphans, gaps, restarts, spool bytes replayed; restart delays against
     the policy; supervisor fd count and RSS; zombies that outlived 1 s (this process is
     the children's subreaper, as init or systemd would be, and reaps those a killed
     supervisor left: tests/faults/system.py).
Prints the fault counts, the accounting table, the memory table, then one JSON line.
A benchmark: it asserts nothing, it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import PolysimProcess, with_schema  # noqa: E402
from tests.faults import accounting  # noqa: E402
from tests.faults import scenario as S  # noqa: E402
from tests.faults.chaos import Chaos, Kill, slope_per_minute  # noqa: E402
from tests.faults.chaos import log_time as chaos_log_time  # noqa: E402
from tests.faults.proxy import Proxy  # noqa: E402
from tests.faults.system import System, proc_children, rss_kb  # noqa: E402

DEFAULT_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
INITIAL, MAXIMUM = 0.5, 2.0


def start_polysim(args) -> PolysimProcess:
    cmd = [sys.executable, "-m", "polysim", "--port", "0", "--markets", str(args.markets), "--seed",
           str(args.seed), "--trade-rate", str(args.rate)]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("polysim listening on "):
                return PolysimProcess(proc, int(line.strip().rsplit(":", 1)[1]))
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("soak: polysim did not start")


def ledger_pages(sim: PolysimProcess, page: int = 200_000):
    """Every ledger entry, fetched page by page (a 30-minute run holds millions)."""
    since = 0
    while True:
        with urllib.request.urlopen(f"{sim.base_url}/_sim/ledger?since={since}&limit={page}", timeout=300) as r:
            doc = json.loads(r.read())
        yield from doc["trades"]
        if not doc["trades"] or doc.get("next") is None or doc["next"] <= since:
            return
        since = doc["next"]
        if since >= doc.get("total", since):
            return


def memory_sample(system: System, samples: dict, t: float) -> None:
    sup = system.proc.pid if system.proc and system.proc.poll() is None else None
    if sup is None:
        return
    names = {}
    for name, child in system.children().items():
        if child.get("pid"):
            names[child["pid"]] = name
    for pid, name in [(sup, "supervisor")] + [(p, names.get(p, f"pid {p}")) for p in proc_children(sup)]:
        rss = rss_kb(pid)
        if rss is not None:
            samples.setdefault(name, []).append((t, pid, rss))


def explain_missing(sim: PolysimProcess, dsn: str, keys: list, log_text: str) -> list[dict]:
    """For each missing trade: when it happened and was published, the gaps of its token
    around it, its token's coverage mark and shard, its transaction's stored fills, and the
    supervisor's kills/spawns of that shard within 30 s: what a diagnosis starts from."""
    wanted = {tuple(k) for k in keys}
    found = []
    for t in ledger_pages(sim):
        key = accounting.trade_key(t["asset_id"], t["transaction_hash"], t["price"], t["size"], t["side"])
        if key in wanted:
            found.append(t)
    conn = psycopg2.connect(dsn, connect_timeout=10)
    out = []
    try:
        with conn.cursor() as cur:
            for t in found:
                ts = int(t["timestamp"]) / 1000
                cur.execute("SELECT started_at, ended_at, reason, recovered_at, recovered_trades, shard FROM feed_gaps"
                            " WHERE token_id = %s AND started_at <= to_timestamp(%s) + interval '30 s'"
                            " AND coalesce(ended_at, 'infinity') >= to_timestamp(%s) - interval '30 s'"
                            " ORDER BY started_at", (t["asset_id"], ts, ts))
                gaps = [[str(x) for x in g] for g in cur.fetchall()]
                cur.execute("SELECT covered_until, shard FROM feed_coverage WHERE token_id = %s", (t["asset_id"],))
                cov = cur.fetchone()
                cur.execute("SELECT source, ordinal, ts, received_at FROM trades WHERE tx_hash = %s ORDER BY ts",
                            (t["transaction_hash"],))
                fills = [[str(x) for x in r] for r in cur.fetchall()]
                shard = cov[1] if cov else None
                name = "trades" if shard in (None, "0/1") else f"trades.{shard.split('/')[0]}"
                events = []
                for line in log_text.splitlines():
                    if f"supervisor: {name}:" in line and ("spawned" in line or "restart #" in line):
                        try:
                            at = chaos_log_time(line[:23])
                        except ValueError:
                            continue
                        if abs(at - ts) <= 30:
                            events.append(f"{at - ts:+.1f}s {line[24:][:140]}")
                out.append({"token": t["asset_id"][:12], "tx": t["transaction_hash"][:12], "ts": t["timestamp"],
                            "published_minus_ts_ms": t["published_ms"] - int(t["timestamp"]),
                            "shard": shard, "covered_until": str(cov[0]) if cov else None, "gaps": gaps,
                            "tx_fills_stored": fills, "shard_events": events})
    finally:
        conn.close()
    return out


def mixed_fault(rng, system, sim, proxy, direct, journal, chaos, state, args) -> None:
    """One fault drawn at random (see the module docstring, step 3)."""
    roll = rng.random()
    now = time.monotonic()
    sparing = now >= state["spare_at"]
    targets = sorted(n for n in system.children() if not (sparing and n in state["spare"]))
    if roll < 0.43 and not targets:
        S.exchange_fault(sim, journal, rng.choice(S.EXCHANGE_FAULTS))
    elif roll < 0.28:
        got = S.kill_child(system, journal, rng, names=targets)
        if got:
            chaos.kills.append(Kill(got[0], got[1], time.time() - (time.monotonic() - got[2])))
    elif roll < 0.40:
        S.stop_cont(system, journal, rng, rng.uniform(0.1, 1.0), names=targets)
    elif roll < 0.43:
        name = rng.choice(sorted(set(S.live_children(system)) & set(targets)) or targets)
        try:
            S.stop_child(system, journal, name, args.watchdog)
        except AssertionError as err:
            journal.add("watchdog check failed", str(err)[:200])
    elif roll < 0.73:
        S.exchange_fault(sim, journal, rng.choice(S.EXCHANGE_FAULTS))
    elif roll < 0.80:
        S.terminate_backends(direct, proxy, journal)
    elif roll < 0.85:
        S.outage(proxy, journal, rng.uniform(5, 15))
    elif roll < 0.90:
        S.conflicting_rows(sim, direct, journal)
    elif roll < 0.92 and now - state["last_sup_kill"] > 120 and not sparing:
        state["last_sup_kill"] = now
        pid = system.kill_supervisor()
        journal.add("kill -9 supervisor", f"pid {pid}")
        time.sleep(2)
        state["orphans_after_sup_kill"] += len(system.orphans())
        system.start(wait=120)
        journal.add("fresh start")
    else:
        S.exchange_fault(sim, journal, rng.choice(S.EXCHANGE_FAULTS))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=2000.0, help="trades/s polysim publishes")
    p.add_argument("--markets", type=int, default=50)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--every-min", type=float, default=2.0, help="seconds between faults, at least")
    p.add_argument("--every-max", type=float, default=6.0, help="seconds between faults, at most")
    p.add_argument("--s25", action="store_true", help="process chaos only (kill -9 / SIGSTOP+SIGCONT, 0.5-3 s)")
    p.add_argument("--sample", type=float, default=60.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=None, help="minutes ignored by the memory slope "
                   "(default: 2, or a fifth of the run if shorter)")
    p.add_argument("--spare", default=None, help="comma-separated processes spared from process faults "
                   "from --spare-from on (default: markets,prices,orderbooks,resolutions and the first "
                   "trade shard; '' spares none)")
    p.add_argument("--spare-from", type=float, default=None, help="minute from which --spare applies and "
                   "the supervisor is no longer killed (default: a third of the run)")
    p.add_argument("--watchdog", type=float, default=5.0)
    p.add_argument("--dsn", default=os.environ.get("COLLECTORD_TEST_DSN", DEFAULT_DSN))
    p.add_argument("--keep", action="store_true", help="keep the run directory and the schema")
    p.add_argument("--quick", action="store_true", help="12 s at 200 trades/s over 10 markets, a fault every "
                   "2-4 s (defaults only: flags given still win)")
    if "--quick" in argv:
        p.set_defaults(minutes=0.2, rate=200.0, markets=10, every_min=2.0, every_max=4.0)
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(2.0, args.minutes / 5)
    if args.spare is None:
        first = "trades" if args.shards == 1 else "trades.0"
        args.spare = f"markets,prices,orderbooks,resolutions,{first}"
    spare = {n.strip() for n in args.spare.split(",") if n.strip()}
    spare_from = args.spare_from if args.spare_from is not None else args.minutes / 3
    rng = random.Random(args.seed)

    base = Path(tempfile.mkdtemp(prefix="collectord-soak-"))
    schema = "soak_" + uuid.uuid4().hex[:10]
    admin = psycopg2.connect(args.dsn, connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE SCHEMA "{schema}"')
    direct = with_schema(args.dsn, schema)
    parts = dict(x.split("=", 1) for x in args.dsn.split())
    proxy = Proxy((parts.get("host", "127.0.0.1"), int(parts.get("port", 5432)))).start()
    parts.update(host="127.0.0.1", port=str(proxy.port))
    proxied = with_schema(" ".join(f"{k}={v}" for k, v in parts.items()), schema)
    sim = start_polysim(args)
    system = System(base, proxied, sim, shards=args.shards, watchdog=args.watchdog, backoff_initial=INITIAL,
                    backoff_max=MAXIMUM, max_restarts=1_000_000, reap_orphans=True)
    journal = S.Journal()
    chaos = Chaos(system, rng)
    spool = accounting.SpoolWatcher(system.spool_dir, every=1.0).start()
    samples: dict[str, list[tuple[float, int, int]]] = {}
    state = {"last_sup_kill": time.monotonic(), "orphans_after_sup_kill": 0, "spare": spare,
             "spare_at": (time.monotonic() + spare_from * 60) if spare else float("inf")}
    code = None
    settled = False
    cutoff = None
    print(f"soak: {args.minutes:g} min at {args.rate:g} trades/s, {args.markets} markets, "
          f"{args.shards} trade shards, {'S25 chaos' if args.s25 else 'mixed faults'}"
          f"{f'; sparing {sorted(spare)} from minute {spare_from:g}' if spare and not args.s25 else ''}; "
          f"run dir {base}, schema {schema}", flush=True)
    t_start = time.time()
    try:
        system.start(wait=120)
        end = time.monotonic() + args.minutes * 60
        next_sample = time.monotonic()
        long_outage_at = time.monotonic() + args.minutes * 30 if args.minutes >= 10 and not args.s25 else None
        if args.s25:
            def tick():
                nonlocal next_sample
                if time.monotonic() >= next_sample:
                    next_sample += args.sample
                    memory_sample(system, samples, time.time() - t_start)
            chaos.run(args.minutes * 60, tick=tick)
        else:
            chaos._thread.start()  # the monitor only: first sight of pids, zombies, supervisor fds/RSS
            while time.monotonic() < end:
                if time.monotonic() >= next_sample:
                    next_sample += args.sample
                    memory_sample(system, samples, time.time() - t_start)
                    print(f"  {int(time.time() - t_start):5d}s faults so far: {journal.counts()}", flush=True)
                if long_outage_at is not None and time.monotonic() >= long_outage_at:
                    long_outage_at = None
                    S.outage(proxy, journal, 60.0)
                else:
                    mixed_fault(rng, system, sim, proxy, direct, journal, chaos, state, args)
                time.sleep(rng.uniform(args.every_min, args.every_max))
        sim.faults(clear=True)
        proxy.up()
        chaos.finish()
        memory_sample(system, samples, time.time() - t_start)
        settled = S.quiesce(system, direct, timeout=300)
        cutoff = accounting.now_ms() - 2000
        time.sleep(3)
    finally:
        code = system.stop(timeout=60)
        orphans = system.orphans()
        system.close()
        spool.stop()
    delays = chaos.restart_delays(system.log_text(), INITIAL, MAXIMUM)
    measured = [d for d in delays if d["measured"] is not None and d["announced"] is not None]
    errors = [abs(d["measured"] - d["announced"]) for d in measured]
    figures = accounting.collect(ledger_pages(sim), direct, cutoff_ms=cutoff, restarts=system.restarts(),
                                 spool=spool, spool_dir=system.spool_dir, extra={
                                     "minutes": args.minutes, "rate": args.rate, "settled": settled,
                                     "orphans": len(orphans) + state["orphans_after_sup_kill"],
                                     "supervisor_exit": code, "supervisor_starts": system.starts,
                                     "kills_measured": len(measured),
                                     "restart_error_max_s": round(max(errors, default=0.0), 3),
                                     "restarts_off_by_more_than_0_5s": sum(1 for e in errors if e > 0.5),
                                     "restarts_not_policy": sum(1 for d in measured
                                                                if abs(d["announced"] - d["policy"]) > 1e-6),
                                     "zombies_over_1s": sum(1 for t in chaos.zombie_max.values() if t > 1.0),
                                     **chaos.supervisor_figures(warmup * 60)})
    memory = {}
    for name, rows in sorted(samples.items()):
        # A killed child comes back as a new process with a fresh heap: the slope is taken over
        # the longest-lived incarnation's samples after the warm-up, never across pids.
        by_pid: dict[int, list[tuple[float, float]]] = {}
        for t, pid, rss in rows:
            by_pid.setdefault(pid, []).append((t, rss))
        late = {pid: [s for s in got if s[0] >= warmup * 60] for pid, got in by_pid.items()}
        pid = max(late, key=lambda p: len(late[p]), default=None)
        longest = late.get(pid, [])
        memory[name] = {"samples": len(rows), "pids": len(by_pid), "spared": name in spare,
                        "pid": pid, "pid_minutes": round((by_pid[pid][-1][0] - by_pid[pid][0][0]) / 60, 1)
                        if pid else 0,
                        "slope_samples": len(longest),
                        "rss_mb_from": round(longest[0][1] / 1024, 1) if longest else None,
                        "rss_mb_to": round(longest[-1][1] / 1024, 1) if longest else None,
                        "rss_mb_max_any_pid": round(max(r for _, _, r in rows) / 1024, 1),
                        "slope_kb_per_min": round(slope_per_minute(longest), 1) if len(longest) >= 2 else None,
                        # the measured pid's RSS (MB) at the first sample of each minute of the run
                        "by_minute": {int(t // 60): round(r / 1024, 1) for t, r in reversed(by_pid.get(pid, []))}}
    print(f"faults: {journal.counts()}")
    print(accounting.table(figures, f"soak {args.minutes:g} min at {args.rate:g} trades/s"))
    print(f"memory (RSS each {args.sample:g} s; least-squares slope after {warmup:g} min warm-up, over the "
          "longest-lived pid of each process name; * = spared from process faults after "
          f"minute {spare_from:g}):")
    print(f"  {'process':<14} {'pids':>5} {'pid lived':>9} {'slope n':>7} {'from MB':>8} {'to MB':>6} "
          f"{'kB/min':>9} {'max MB any pid':>14}")
    for name, m in memory.items():
        slope = m["slope_kb_per_min"] if m["slope_kb_per_min"] is not None else "-"
        label = name + (" *" if m["spared"] else "")
        print(f"  {label:<14} {m['pids']:>5} {m['pid_minutes']:>7}min {m['slope_samples']:>7} "
              f"{m['rss_mb_from'] if m['rss_mb_from'] is not None else '-':>8} "
              f"{m['rss_mb_to'] if m['rss_mb_to'] is not None else '-':>6} {slope:>9} {m['rss_mb_max_any_pid']:>14}")
    print("measured pid's RSS (MB) by minute of the run:")
    for name, m in memory.items():
        series = sorted(m["by_minute"].items())
        print(f"  {name:<12} " + " ".join(f"{minute}:{mb:g}" for minute, mb in series))
    missing_keys = figures.pop("missing_keys", [])
    if missing_keys:
        explained = explain_missing(sim, direct, missing_keys, system.log_text())
        (base / "missing.json").write_text(json.dumps(explained, indent=1) + "\n")
        print(f"missing trades, explained ({len(explained)}; all in {base / 'missing.json'}):")
        for m in explained[:10]:
            print("  " + json.dumps(m))
    out = dict(figures, memory=memory, faults=journal.counts(), run_dir=str(base))
    out.pop("duplicated_rows", None)
    (base / "soak.json").write_text(json.dumps(out, default=str) + "\n")
    print(json.dumps(out, default=str))
    sim.stop()
    proxy.stop()
    if not args.keep:
        with admin.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(base, ignore_errors=True)
    admin.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
