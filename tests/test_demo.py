"""`collectord demo`: polysim + supervisor + embedded PostgreSQL, run for real, summary checked."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("markets", "tokens", "followed_tokens", "price_snapshots", "orderbook_snapshots", "trades")


def summary_rows(out: str) -> dict[str, int]:
    """The 'rows per table' block of the demo's summary."""
    assert "rows per table:" in out, out
    block = out.split("rows per table:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\w+)\s+(\d+)\s*$", block, re.M)}


def test_gap_line_says_what_is_owed():
    from datetime import datetime, timezone

    from collectord.demo import gap_line

    gaps = {"opened": 60, "recovered": 50, "unrecoverable": 1, "open": 9,
            "oldest_open_started_at": datetime.fromtimestamp(1000, timezone.utc)}
    assert gap_line(gaps, 1042.0) == ("feed gaps: 60 opened, 50 recovered, 1 unrecoverable, 9 still open "
                                      "(the oldest started 42s ago): the trades they hold are owed, and the "
                                      "next start fetches them")
    assert gap_line(dict(gaps, recovered=59, open=0, oldest_open_started_at=None), 0) == (
        "feed gaps: 60 opened, 59 recovered, 1 unrecoverable, 0 still open")


def processes_under(directory: Path) -> list[str]:
    """Command lines of live processes that mention the demo directory (polysim, supervisor, postgres)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        if str(directory) in cmd and stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3] != b"Z":
            found.append(f"{entry}: {cmd}")
    return found


def descendants(root: int) -> set[int]:
    """Pids of every live descendant of root (from /proc/*/stat ppid links)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rfind(b")") + 2:].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2: stat.rfind(b")") + 3] != b"Z":
            out.add(pid)
    return out


def wait_all_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pids)


def demo_cmd(directory: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "collectord", "demo", "--dir", str(directory), *extra]


@pytest.mark.slow
def test_demo_for_20_seconds_collects_rows(tmp_path):
    directory = tmp_path / "demo"
    t0 = time.monotonic()
    proc = subprocess.run(demo_cmd(directory, "--seconds", "20"), cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=dict(os.environ, COLLECTORD_CONFIG=""))
    took = time.monotonic() - t0
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"directory {directory}" in out
    rows = summary_rows(out)
    for table in ("markets", "tokens", "trades"):
        assert rows.get(table, 0) > 0, f"no rows in {table}: {out}"
    assert rows.get("followed_tokens", 0) > 0 and rows.get("price_snapshots", 0) > 0, out
    # What the stopped run still owes: start gaps may be waiting for the backfill delay.
    gaps = re.search(r"^feed gaps: (\d+) opened, (\d+) recovered, (\d+) unrecoverable, (\d+) still open", out, re.M)
    assert gaps, out
    opened, recovered, unrecoverable, still_open = map(int, gaps.groups())
    assert opened > 0 and opened == recovered + unrecoverable + still_open and unrecoverable == 0, out
    # Periodic lines while it ran, and where the data is at the end.
    assert len(re.findall(r"^\[\s*\d+s\] ", out, re.M)) >= 3, out
    assert f"data directory {directory / 'data' / 'pgdata'}" in out
    assert "psql 'postgresql://" in out
    assert (directory / "collectord.conf").exists()
    assert not processes_under(directory), processes_under(directory)
    print(f"demo --seconds 20 took {took:.1f}s wall")


@pytest.mark.slow
def test_demo_stops_cleanly_on_ctrl_c(tmp_path):
    """SIGINT (Ctrl-C) while it runs: supervisor and polysim stopped, summary printed, exit 0."""
    directory = tmp_path / "demo"
    proc = subprocess.Popen(demo_cmd(directory), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, COLLECTORD_CONFIG=""))
    lines = []
    try:
        deadline = time.monotonic() + 300
        while True:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("no progress line with markets > 0: " + "".join(lines) + proc.stderr.read())
            lines.append(line)
            m = re.match(r"^\[\s*\d+s\] markets (\d+)", line)
            if m and int(m.group(1)) > 0:
                break
        tree = descendants(proc.pid)  # polysim, supervisor, collectors (the postmaster: by its -D path)
        assert len(tree) >= 3, (tree, lines)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out + err
    assert "SIGINT, stopping" in out
    assert summary_rows(out).get("markets", 0) > 0, out
    assert "Traceback" not in err, err
    assert not alive(tree), alive(tree)
    assert not processes_under(directory), processes_under(directory)


def test_demo_refuses_a_directory_under_root_as_root():
    if os.geteuid() != 0:
        pytest.skip("the /root rule applies to root only")
    proc = subprocess.run([sys.executable, "-m", "collectord", "demo", "--dir", "/root/collectord-demo-test",
                           "--seconds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "outside /root" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not Path("/root/collectord-demo-test").exists()


@pytest.mark.slow
def test_demo_killed_leaves_nothing_behind(tmp_path):
    """kill -9 of the demo: polysim and the supervisor get SIGTERM (PR_SET_PDEATHSIG) and stop,
    the supervisor stopping its collectors and the embedded PostgreSQL."""
    directory = tmp_path / "demo"
    proc = subprocess.Popen(demo_cmd(directory), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, COLLECTORD_CONFIG=""))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo ended early"
            if re.match(r"^\[\s*\d+s\] markets [1-9]", line):
                break
        tree = descendants(proc.pid) | {int(p.split(":")[0]) for p in processes_under(directory)}
        assert len(tree) >= 4, tree  # polysim, supervisor, collectors, postmaster
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert not wait_all_gone(tree, 90), alive(tree)
    assert not processes_under(directory), processes_under(directory)


def _psql_count(line: str, env: dict) -> int:
    """Run a printed `psql '...' -c 'SELECT count(*) ...'` line as a shell would; the count."""
    r = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, (line, r.stdout, r.stderr)
    m = re.search(r"^\s*(\d+)\s*$", r.stdout, re.M)
    assert m, r.stdout
    return int(m.group(1))


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for a unix socket path under it (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(prefix="cd-", dir="/tmp"))
    os.chmod(path, 0o755)  # the embedded server's own user (as root) must traverse it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_demo_data_is_queried_after_it_ends_with_the_commands_it_prints(short_tmp):
    """Default directory: a new run-TIME directory, an earlier run's data left alone; the log is
    the file the config names, without the XDG_RUNTIME_DIR warning; and the two printed commands
    (db serve, then psql) give back what the summary counted, with no collector restarted."""
    tmp_path = short_tmp
    base = tmp_path / "collectord-demo"
    earlier = base / "run-20000101-000000" / "data" / "pgdata"
    earlier.mkdir(parents=True)
    (earlier / "PG_VERSION").write_text("earlier run\n")
    env = dict(os.environ, COLLECTORD_CONFIG="", TMPDIR=str(tmp_path),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")
    env.pop("XDG_RUNTIME_DIR", None)
    proc = subprocess.run(demo_cmd_default("--seconds", "5"), cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    run_dir = Path(re.search(r"^collectord demo: directory (\S+)$", out, re.M).group(1))
    assert run_dir.parent == base and run_dir.name.startswith("run-") and run_dir.name != "run-20000101-000000"
    assert f"1 earlier run(s) kept under {base} (the latest: run-20000101-000000)" in out
    assert (earlier / "PG_VERSION").read_text() == "earlier run\n"

    # The log: the file the config names, holding the supervisor's output; nothing else.
    log = run_dir / "log" / "collectord.log"
    assert f"logfile = {log}\n" in (run_dir / "collectord.conf").read_text()
    assert sorted(p.name for p in (run_dir / "log").iterdir()) == ["collectord.log", "polysim.log"]
    text = log.read_text()
    assert "embedded PostgreSQL started" in text and "XDG_RUNTIME_DIR" not in text and "Warning" not in text

    trades = summary_rows(out)["trades"]
    serve = re.search(r"^  serve it:  (.+?)   \(the database only, until Ctrl-C\)$", out, re.M).group(1)
    query = re.search(r"^  query it, from another terminal meanwhile:  (.+)$", out, re.M).group(1)
    assert query.endswith(" -c 'SELECT count(*) FROM trades'") and "psql '" in query
    server = subprocess.Popen(["sh", "-c", f"exec {serve}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=str(tmp_path))
    try:
        lines = [server.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"collectord db serve: embedded PostgreSQL under {run_dir / 'data' / 'pgdata'}"), (
            lines, server.stderr.read() if server.poll() is not None else "")
        assert lines[1].strip() == f"query it:  {query.rsplit(' -c ', 1)[0]}"  # the URI the demo printed
        assert _psql_count(query, env) == trades
        # Only the database: no supervisor, no collector retrying the polysim that is gone.
        conf = serve.split(" -c ", 1)[1].split(" db serve")[0]
        status = subprocess.run(shlex.split(serve.split(" -c ", 1)[0]) + ["-c", conf, "status"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert status.returncode == 3 and status.stdout.startswith("collectord is not running"), status
        server.send_signal(signal.SIGINT)
        rest, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
    assert server.returncode == 0, err
    assert rest.strip() == "collectord db serve: SIGINT, database stopped" and err == ""
    assert not wait_all_gone({int(p.split(":")[0]) for p in processes_under(run_dir)}, 30)
    assert not processes_under(run_dir), processes_under(run_dir)


def demo_cmd_default(*extra: str) -> list[str]:
    return [sys.executable, "-m", "collectord", "demo", *extra]


def test_demo_never_wipes_an_earlier_runs_data(tmp_path):
    """--dir D holding an earlier run: refused in one line that says how to query or free it;
    nothing removed, nothing started."""
    directory = tmp_path / "demo"
    pgdata = directory / "data" / "pgdata"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("earlier run\n")
    broken = tmp_path / "broken.conf"  # the demo writes its own config: a broken one elsewhere is not its business
    broken.write_text("not INI\n")
    proc = subprocess.run(demo_cmd(directory, "--seconds", "1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, COLLECTORD_CONFIG=str(broken)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
    assert f"{directory} holds an earlier run's data" in proc.stderr and "db serve" in proc.stderr
    assert (pgdata / "PG_VERSION").read_text() == "earlier run\n"
    assert not (directory / "log" / "polysim.log").exists()


def test_the_readme_newcomer_path_ends_with_the_query_the_demo_prints():
    """The README shows the summary's two query commands in the very shape the demo prints
    them (the test above runs the demo's own lines)."""
    readme = (ROOT / "README.md").read_text()
    path = readme.split("## Two commands", 1)[1].split("## Running it for real", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", path, re.S)
    assert len(blocks) == 2 and "collectord demo" in blocks[0], blocks
    serve, query = blocks[1].strip().splitlines()
    m = re.fullmatch(r"\S+/collectord -c (/tmp/collectord-demo/run-\d{8}-\d{6})/collectord\.conf db serve", serve)
    assert m, serve
    run = m.group(1)
    assert query == (f"psql 'postgresql://postgres@/collectord?host={run}/data/pgdata&port=5432' "
                     "-c 'SELECT count(*) FROM trades'")
