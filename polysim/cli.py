"""Command line: `polysim --port P --markets N --seed S --trade-rate R [options]`.

Parses arguments into an immutable Options value, then serves until SIGTERM or
SIGINT (exit 0). Bad arguments: one line on stderr, exit 2 (argparse's usage
error code). A port that cannot be bound: one line, exit 69 (EX_UNAVAILABLE).
"""

from __future__ import annotations

import argparse
import logging
import sys

from polysim.options import Options


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
        return value
    return convert


def build_parser() -> argparse.ArgumentParser:
    d = Options()
    p = argparse.ArgumentParser(
        prog="polysim",
        description="Polymarket-compatible simulated exchange: Gamma at /gamma, CLOB at /clob, "
                    "Data API at /data, market WebSocket at /ws/market, control at /_sim/*.")
    p.add_argument("--host", default=d.host, help="address to bind (default %(default)s: loopback only)")
    p.add_argument("--port", type=_positive(int), default=d.port, help="port; 0 picks a free one (printed)")
    p.add_argument("--markets", type=_positive(int), default=d.markets, help="open markets at start")
    p.add_argument("--seed", type=int, default=d.seed, help="seed: same seed and options, same exchange")
    p.add_argument("--trade-rate", type=_positive(float), default=d.trade_rate,
                   help="trades (fills) per second across the exchange")
    p.add_argument("--closed-markets", type=_positive(int), default=None,
                   help="already-resolved markets at start (default markets/4)")
    p.add_argument("--resolve-rate", type=_positive(float), default=d.resolve_rate,
                   help="markets closing per second (default %(default)s: none)")
    p.add_argument("--resolve-delay", type=_positive(float), default=d.resolve_delay,
                   help="seconds from close (proposed) to resolution")
    p.add_argument("--void-rate", type=_positive(float), default=d.void_rate,
                   help="share of resolutions that are 50-50 voids")
    p.add_argument("--new-market-rate", type=_positive(float), default=d.new_market_rate,
                   help="new markets per second (default %(default)s: none)")
    p.add_argument("--clob-delay", type=_positive(float), default=d.clob_delay,
                   help="seconds a new market answers 404 on the CLOB")
    p.add_argument("--book-rate", type=_positive(float), default=d.book_rate,
                   help="book level changes per second across the exchange")
    p.add_argument("--no-trade-book-updates", dest="trade_book_updates", action="store_false",
                   help="do not announce what trades do to books (no price_change for the levels a trade "
                        "changed, no `book` refresh after trades): a trades-only feed")
    p.add_argument("--multi-fill", type=_positive(float), default=d.multi_fill,
                   help="share of transactions with several fills")
    p.add_argument("--ts-jitter-ms", type=_positive(int), default=0,
                   help="trade timestamps reordered by up to this many ms (real feed: ~100)")
    p.add_argument("--ping-timeout", type=_positive(float), default=d.ping_timeout,
                   help="seconds without a text PING before a WebSocket is dropped")
    p.add_argument("--epoch-ms", type=int, default=None,
                   help="simulated time zero as epoch ms (default: now) for reproducible timestamps")
    p.add_argument("--batch-max", type=_positive(int), default=d.batch_max,
                   help="most messages per WebSocket array frame")
    p.add_argument("--max-frame-ids", type=_positive(int), default=d.max_frame_ids,
                   help="ids in one subscribe frame above which the connection is closed")
    p.add_argument("--max-dump-assets", type=_positive(int), default=d.max_dump_assets,
                   help="assets per connection past which no initial book is sent")
    p.add_argument("--max-pending", type=_positive(int), default=d.max_pending,
                   help="messages a WebSocket client may fall behind before it is dropped")
    p.add_argument("--clob-page-size", type=_positive(int), default=d.clob_page_size,
                   help="rows per CLOB /markets page")
    p.add_argument("--max-batch-ids", type=_positive(int), default=d.max_batch_ids,
                   help="ids one CLOB batch request (/books, /prices, /midpoints, /spreads, /last-trades-prices) "
                        "may name; more are answered 400 (default %(default)s)")
    p.add_argument("--tick", type=_positive(float), default=d.tick, help="engine period in seconds")
    p.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.multi_fill > 1 or args.void_rate > 1:
        print("polysim: --multi-fill and --void-rate are shares within [0, 1]", file=sys.stderr)
        return 2
    if args.batch_max < 1 or args.clob_page_size < 1 or args.max_batch_ids < 1 or args.tick <= 0:
        print("polysim: --batch-max, --clob-page-size, --max-batch-ids and --tick must be positive", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="polysim %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    opts = Options(
        host=args.host, port=args.port, markets=args.markets, seed=args.seed,
        trade_rate=args.trade_rate, closed_markets=args.closed_markets,
        resolve_rate=args.resolve_rate, resolve_delay=args.resolve_delay, void_rate=args.void_rate,
        new_market_rate=args.new_market_rate, clob_delay=args.clob_delay, book_rate=args.book_rate,
        trade_book_updates=args.trade_book_updates, multi_fill=args.multi_fill,
        ping_timeout=args.ping_timeout, ts_jitter_ms=args.ts_jitter_ms, epoch_ms=args.epoch_ms, batch_max=args.batch_max,
        clob_page_size=args.clob_page_size, tick=args.tick,
        max_frame_ids=args.max_frame_ids, max_dump_assets=args.max_dump_assets,
        max_pending=args.max_pending, max_batch_ids=args.max_batch_ids,
    )
    from polysim.server import run  # aiohttp is only needed to serve, not to print --help

    try:
        return run(opts)
    except KeyboardInterrupt:
        return 0
