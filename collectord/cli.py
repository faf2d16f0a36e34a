"""Command line: build_parser() (stdlib only, argparse-manpage imports it) and main().

main() parses arguments, loads the config once, runs one command and returns its
exit code. Every CollectordError becomes one line on stderr and its exit_code;
nothing else prints a traceback except a genuine bug.
"""

from __future__ import annotations

import argparse
import sys

from collectord import __version__


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI (DESIGN §4). Stdlib only: the man page is generated from it."""
    parser = argparse.ArgumentParser(
        prog="collectord",
        description=(
            "Record Polymarket's public market data (markets, prices, order books, "
            "resolutions, live trades) into PostgreSQL under a forking supervisor."
        ),
        epilog=(
            "Config file: -c, else $COLLECTORD_CONFIG, else /etc/collectord/collectord.conf, "
            "else built-in defaults. Exit codes: 0 ok, 1 failure, 3 not running (status), "
            "78 configuration error."
        ),
    )
    parser.add_argument("-c", "--config", metavar="CONFIG", help="path of the INI configuration file")
    parser.add_argument("--version", action="version", version=f"collectord {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("start", help="start the supervisor (daemonized unless --foreground)")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")

    p = sub.add_parser("stop", help="SIGTERM the running supervisor and wait for it to exit")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait (default: graceful_timeout + 10)")

    p = sub.add_parser("restart", help="stop, then start")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop timeout in seconds")

    sub.add_parser("reload", help="SIGHUP: re-read config, reopen logs, restart changed collectors")

    p = sub.add_parser("status", help="per-collector table; exit 0 running, 1 dead with PID file, 3 stopped")
    p.add_argument("--json", action="store_true", help="print status.json as JSON")

    sub.add_parser("check", help="validate the config and reach the database and the exchange")

    p = sub.add_parser("db", help="database administration")
    dbsub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND")
    dbsub.required = True
    dbsub.add_parser("upgrade", help="apply schema migrations (start does it too)")

    p = sub.add_parser("demo", help="offline demo: polysim + embedded PostgreSQL, in the foreground")
    p.add_argument("--dir", metavar="D", default=None,
                   help="directory for the demo's database, logs and PID file "
                        "(default: collectord-demo in the system temp directory)")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="stop by itself after S seconds (default: run until Ctrl-C)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the command, return its exit code."""
    from collectord.errors import CollectordError

    args = build_parser().parse_args(argv)
    try:
        from collectord import control

        return control.run(args)
    except CollectordError as err:
        print(f"collectord: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as err:  # an environment problem (permissions, a full disk): one line, not a traceback
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"collectord: {err.strerror or err}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
