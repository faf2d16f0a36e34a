"""Command line: build_parser() (stdlib only, argparse-manpage imports it) and main().

main() parses arguments, loads the config once, runs one command and returns its
exit code. Every CollectordError becomes one line on stderr and its exit_code;
nothing else prints a traceback except a genuine bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from collectord import __version__


# The tables `export` writes (workers.storage.export.EXPORTS, which the parser cannot import:
# it pulls in pyarrow; a test checks the two agree).
EXPORT_TABLES = ("trades", "price_snapshots", "orderbook_snapshots", "feed_gaps", "resolutions",
                 "markets", "tokens")


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI (DESIGN §4). Stdlib only: the man page is generated from it."""
    parser = argparse.ArgumentParser(
        prog="collectord",
        description=(
            "Record Polymarket's public market data (markets, prices, order books, "
            "resolutions, live trades) into PostgreSQL under a forking supervisor."
        ),
        epilog=(
            "Config file: -c (before or after the command), else $COLLECTORD_CONFIG, else "
            "/etc/collectord/collectord.conf, else built-in defaults. Exit codes: 0 ok, 1 failure, "
            "2 usage (book: a bad token id or time), 3 not running (status), 4 status unknown (status), 6 not configured (stop), "
            "78 configuration error."
        ),
    )
    parser.add_argument("-c", "--config", metavar="CONFIG", help="path of the INI configuration file")
    parser.add_argument("--version", action="version", version=f"collectord {__version__}")
    # -c after the command too (`collectord status -c FILE`, as users type it). SUPPRESS:
    # when it is absent there, the value given before the command stands.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("-c", "--config", metavar="CONFIG", default=argparse.SUPPRESS,
                        help="path of the INI configuration file (also accepted before the command)")
    common = [config]
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("start", parents=common, help="start the supervisor (daemonized unless --foreground)")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")

    p = sub.add_parser("stop", parents=common, help="SIGTERM the running supervisor and wait for it to exit")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait (default: graceful_timeout + 10)")

    p = sub.add_parser("restart", parents=common, help="stop, then start")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop timeout in seconds")

    sub.add_parser("reload", parents=common,
                   help="SIGHUP: re-read config, reopen logs, restart changed collectors")

    p = sub.add_parser("status", parents=common,
                       help="per-collector table; exit 0 running, 1 dead with PID file, 3 stopped, 4 unknown")
    p.add_argument("--json", action="store_true", help="print status.json as JSON")

    sub.add_parser("check", parents=common, help="validate the config and reach the database and the exchange")

    p = sub.add_parser("db", parents=common, help="database administration")
    dbsub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND")
    dbsub.required = True
    dbsub.add_parser("upgrade", parents=common, help="apply schema migrations (start does it too)")
    dbsub.add_parser("serve", parents=common,
                     help="run only the embedded PostgreSQL (empty dsn), in the foreground until Ctrl-C, "
                          "and print how to connect: to query a stopped run's data, such as the demo's")

    p = sub.add_parser(
        "export", parents=common,
        help="write a table to Parquet files for research (pandas, polars, DuckDB): one file per UTC day",
        description=(
            "Write TABLE to Parquet under DIR/TABLE/: TABLE-YYYY-MM-DD.parquet per UTC day for the time "
            "tables, TABLE.parquet for markets, tokens and resolutions (whole, current state). Prices and "
            "sizes are exact decimals, ids strings, times UTC timestamps (microseconds). A re-run skips the "
            "days whose file is complete and whose rows did not change since. Exit codes: 0 done, "
            "1 database unreachable or a value that does not fit its type, 2 bad arguments, 78 bad config, "
            "130/143 interrupted (no partial file is left under a final name)."),
    )
    p.add_argument("table", metavar="TABLE",
                   help=f"one of {', '.join(EXPORT_TABLES)}, or all")
    p.add_argument("--since", metavar="T", default=None,
                   help="first instant, UTC: an ISO date (2026-12-01) or time (2026-12-01T12:00, "
                        "an offset is converted); required for the time tables")
    p.add_argument("--until", metavar="T", default=None,
                   help="end of the range, exclusive, same forms (default: now)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (created if missing)")
    p.add_argument("--force", action="store_true", help="rewrite every file, even when unchanged")

    p = sub.add_parser("book", parents=common,
                       help="print a token's order book at an instant, rebuilt from the recorded book events "
                            "([collector:trades] books = yes)")
    p.add_argument("token", metavar="TOKEN", help="the token (asset) id, decimal")
    p.add_argument("--at", required=True, metavar="TIME",
                   help="ISO 8601 (no zone: UTC), epoch milliseconds or seconds, or now")
    p.add_argument("--depth", type=int, default=10, metavar="N", help="levels printed per side (default 10)")
    p.add_argument("--json", action="store_true", help="print the rebuilt book as one JSON object (every level)")

    p = sub.add_parser("demo", help="offline demo: polysim + embedded PostgreSQL, in the foreground")
    p.add_argument("--dir", metavar="D", default=None,
                   help="directory for this run's database, logs and PID file; it must not hold an "
                        "earlier run's data (default: a new run-TIME directory under collectord-demo "
                        "in the system temp directory, so earlier runs are kept)")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="stop by itself after S seconds (default: run until Ctrl-C)")
    return parser


class _PipeSafe:
    """stdout for the commands: when the reader went away (`collectord status | head -1`),
    the rest of the output is dropped and the command still ends with its own exit code
    (status's LSB code, not 1 for "Broken pipe")."""

    def __init__(self, stream) -> None:
        self.stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
                self.stream.flush()
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        # What is still buffered would fail again at exit: point fd 1 at /dev/null.
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self.stream.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(null)


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the command, return its exit code."""
    from collectord.errors import CollectordError

    args = build_parser().parse_args(argv)
    out = _PipeSafe(sys.stdout)
    try:
        from collectord import control

        return control.run(args, out=out)
    except CollectordError as err:
        print(f"collectord: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stderr's reader went away too: nothing left to tell anyone
        return 1
    except OSError as err:  # an environment problem (permissions, a full disk): one line, not a traceback
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"collectord: {err.strerror or err}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
