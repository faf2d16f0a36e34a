"""Options: the simulator's immutable configuration (built once by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 0
    markets: int = 20              # open markets at start
    seed: int = 1
    trade_rate: float = 5.0        # fills per second across the exchange
    closed_markets: int | None = None  # already-resolved history at start (default markets // 4)
    resolve_rate: float = 0.0      # markets closing per second (each resolves resolve_delay later)
    resolve_delay: float = 2.0     # seconds between close (proposed) and resolution
    void_rate: float = 0.1         # share of resolutions that are 50-50 voids
    new_market_rate: float = 0.0   # new markets per second
    clob_delay: float = 5.0        # seconds a new market answers 404 on the CLOB
    book_rate: float = 10.0        # random book level changes per second across the exchange
    trade_book_updates: bool = True  # announce what trades do to books: a `price_change` per transaction
                                     # for the levels it changed, a `book` refresh (coalesced per tick);
                                     # off, WS books drift from REST after trades (a trades-only feed)
    multi_fill: float = 0.1        # share of transactions with 2-4 fills (some exact repeats)
    ts_jitter_ms: int = 0          # trade timestamps up to this much earlier than publish order
                                   # implies (the real feed reorders by ~100 ms)
    ping_timeout: float = 30.0     # drop a WS connection that sent no text PING for this long
    epoch_ms: int | None = None    # simulated time 0 as epoch ms (None: wall clock at start)
    tick: float = 0.01             # engine period in seconds
    batch_max: int = 500           # most messages in one WS array frame
    max_pending: int = 200_000     # a WS client this far behind is dropped (slow consumer)
    max_frame_ids: int = 2000      # a subscribe frame with more ids closes the connection (real: rs-clob-client-v2 #116)
    max_dump_assets: int = 750     # assets past this many on one connection get no initial `book` (real, 2026)
    clob_page_size: int = 1000     # CLOB /markets rows per page
    max_batch_ids: int = 500       # ids one CLOB batch request may name; more -> 400 (real: ~500, on bytes)
    gamma_default_limit: int = 20  # Gamma list page size when `limit` is omitted

    @property
    def history(self) -> int:
        return self.markets // 4 if self.closed_markets is None else self.closed_markets
