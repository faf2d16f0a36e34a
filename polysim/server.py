"""Server: one aiohttp application on one port, the engine loop, and the control surface.

Order of operations in `serve()`:
  1. Build the exchange (initial state from the seed), the feed and the faults.
  2. Bind the listening socket (loopback by default) and start the engine task,
     which every `tick` releases the events whose simulated time has come and
     wakes the WebSocket writers.
  3. Print "polysim listening on http://HOST:PORT" (the line the fixture waits for).
  4. Wait for SIGTERM/SIGINT (the handlers only set an event), then stop accepting,
     close WebSocket connections with a close frame, and return.

Routes: /gamma/*, /clob/*, /data/*, /ws/market, /_sim/{health,ledger,faults}.
HTTP faults are applied by one middleware keyed on the first path segment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time

from aiohttp import web

from polysim.clob import Clob
from polysim.data import Data
from polysim.exchange import Exchange
from polysim.faults import FaultError, Faults
from polysim.feed import Feed
from polysim.gamma import Gamma
from polysim.options import Options

log = logging.getLogger("polysim")

HTML_403 = ("<!DOCTYPE html><html><head><title>Attention Required! | Cloudflare</title></head>"
            "<body><h1>Sorry, you have been blocked</h1></body></html>")
SURFACES = ("gamma", "clob", "data")


def _json(status: int, payload, dumps=json.dumps) -> web.Response:
    return web.Response(status=status, text=dumps(payload, separators=(",", ":")),
                        content_type="application/json")


def _add_extra(payload):
    """extra_fields fault: an unknown key on every top-level object (and list element)."""
    if isinstance(payload, dict):
        out = {"polysimExtraField": {"nested": [1, "two"]}}
        out.update(payload)
        return out
    if isinstance(payload, list):
        return [_add_extra(p) if isinstance(p, dict) else p for p in payload]
    return payload


class Server:
    def __init__(self, opts: Options):
        self.opts = opts
        self.faults = Faults(opts.seed)
        self.feed = Feed(opts, self.faults)
        epoch = opts.epoch_ms if opts.epoch_ms is not None else int(time.time() * 1000)
        self.exchange = Exchange(opts, epoch, self.feed)
        self.feed.exchange = self.exchange
        self.gamma = Gamma(self.exchange)
        self.clob = Clob(self.exchange)
        self.data = Data(self.exchange)
        self.port = opts.port
        self.listener: asyncio.base_events.Server | None = None
        self.runner: web.AppRunner | None = None
        self.started = time.monotonic()
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.engine_lag = 0.0
        self.failed = False

    # -- app -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults_mw], client_max_size=16 * 1024 * 1024)
        r = app.router
        g, c, d = self.gamma, self.clob, self.data
        r.add_get("/gamma/markets", lambda q: self._reply(g.list_markets(q.query)))
        r.add_get("/gamma/markets/keyset", lambda q: self._reply(g.keyset(q.query, "markets")))
        r.add_get("/gamma/markets/slug/{slug}", lambda q: self._reply(g.market_by_slug(q.match_info["slug"], q.query)))
        r.add_get("/gamma/markets/{id}", lambda q: self._reply(g.one_market(q.match_info["id"], q.query)))
        r.add_get("/gamma/events", lambda q: self._reply(g.list_events(q.query)))
        r.add_get("/gamma/events/keyset", lambda q: self._reply(g.keyset(q.query, "events")))
        r.add_get("/gamma/events/{id}", lambda q: self._reply(g.one_event(q.match_info["id"])))
        r.add_get("/clob/book", lambda q: self._reply(c.book(q.query)))
        r.add_post("/clob/books", self._post(c.books))
        r.add_get("/clob/price", lambda q: self._reply(c.price(q.query)))
        r.add_get("/clob/prices", lambda q: self._reply(c.prices_get(q.query)))
        r.add_post("/clob/prices", self._post(c.prices_post))
        r.add_get("/clob/midpoint", lambda q: self._reply(c.midpoint(q.query)))
        r.add_get("/clob/midpoints", lambda q: self._reply(c.midpoints(_ids(q.query.get("token_ids", "")))))
        r.add_post("/clob/midpoints", self._post(lambda b: c.midpoints(_body_ids(b))))
        r.add_get("/clob/spread", lambda q: self._reply(c.spread(q.query)))
        r.add_post("/clob/spreads", self._post(lambda b: c.spreads(_body_ids(b))))
        r.add_get("/clob/last-trade-price", lambda q: self._reply(c.last_trade_price(q.query)))
        r.add_get("/clob/last-trades-prices",
                  lambda q: self._reply(c.last_trades_prices(_ids(q.query.get("token_ids", "")))))
        r.add_post("/clob/last-trades-prices", self._post(lambda b: c.last_trades_prices(_body_ids(b))))
        r.add_get("/clob/tick-size", lambda q: self._reply(c.tick_size(q.query)))
        r.add_get("/clob/markets", lambda q: self._reply(c.list_markets(q.query)))
        r.add_get("/clob/simplified-markets", lambda q: self._reply(c.list_markets(q.query, simplified=True)))
        r.add_get("/clob/markets/{cid}", lambda q: self._reply(c.one_market(q.match_info["cid"])))
        r.add_get("/clob/markets-by-token/{token}", lambda q: self._reply(c.market_by_token(q.match_info["token"])))
        r.add_get("/clob/time", lambda q: self._reply((200, self.exchange.now_ms // 1000)))
        r.add_get("/clob/ok", lambda q: self._text("OK"))
        r.add_get("/data/trades", lambda q: self._reply(d.trades(q.query)))
        r.add_get("/ws/market", self.feed.handle)
        r.add_get("/_sim/health", self._health)
        r.add_get("/_sim/ledger", self._ledger)
        r.add_get("/_sim/ledger.tsv", self._ledger_tsv)
        r.add_get("/_sim/faults", self._faults_get)
        r.add_post("/_sim/faults", self._faults_post)
        r.add_delete("/_sim/faults", self._faults_delete)
        return app

    async def _reply(self, result) -> web.Response:
        status, payload = result
        return _json(status, payload)

    async def _text(self, text: str) -> web.Response:
        return web.Response(text=text)

    def _post(self, handler):
        async def route(request: web.Request) -> web.Response:
            try:
                body = await request.json()
            except ValueError:
                return _json(400, {"error": "Invalid payload"})
            return _json(*handler(body))
        return route

    @web.middleware
    async def _faults_mw(self, request: web.Request, handler):
        """Apply the active HTTP faults of the surface named by the first path segment."""
        surface = request.path.split("/", 2)[1] if request.path.count("/") >= 1 else ""
        if surface == "ws" and self.faults.items:
            f = self.faults.pick("ws", ("refuse", "429", "5xx"), request.path)
            if f is not None:
                return self._fault_response(request, f)
        if surface not in SURFACES or not self.faults.items:
            response = await handler(request)
            if surface == "gamma":
                response.headers["Cache-Control"] = "public, max-age=300"  # as Cloudflare sends it
            return response
        path = request.path
        f = self.faults.pick(surface, ("refuse", "429", "5xx", "html403"), path)
        if f is not None:
            return self._fault_response(request, f)
        slow = self.faults.pick(surface, ("slow",), path)
        if slow is not None:
            await asyncio.sleep(float(slow.params.get("delay", 2.0)))
        response = await handler(request)
        f = self.faults.pick(surface, ("malformed", "truncated", "cut", "extra_fields"), path)
        if f is None or response.status != 200 or not isinstance(response, web.Response):
            return response
        text = response.text or ""
        if f.kind == "malformed":
            return web.Response(status=200, text="{\"data\": [}{ not json", content_type="application/json")
        if f.kind == "truncated":
            return web.Response(status=200, text=text[: max(1, len(text) // 2)], content_type="application/json")
        if f.kind == "extra_fields":
            return _json(200, _add_extra(json.loads(text)))
        # cut: promise the whole body, send half, hang up.
        body = text.encode()
        cut = web.StreamResponse(status=200)
        cut.content_type = "application/json"
        cut.content_length = len(body)
        await cut.prepare(request)
        await cut.write(body[: max(1, len(body) // 2)])
        if request.transport is not None:
            request.transport.close()
        return cut

    def _fault_response(self, request: web.Request, f) -> web.StreamResponse:
        if f.kind == "refuse":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)  # never reaches the client: the socket is gone
        if f.kind == "429":
            retry = f.params.get("retry_after", 1)
            return web.Response(status=429, headers={"Retry-After": str(int(retry))},
                                text=json.dumps({"error": "Too Many Requests", "retry_after_seconds": retry}),
                                content_type="application/json")
        if f.kind == "html403":
            return web.Response(status=403, text=HTML_403, content_type="text/html")
        status = int(f.params.get("status", 500))
        body = ({"type": "internal error", "error": "polysim injected fault"}
                if request.path.startswith("/gamma") else {"error": "polysim injected fault"})
        return _json(status, body)

    # -- control --------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        x = self.exchange
        return _json(200, {
            "ok": True, "seed": self.opts.seed, "sim_time": round(x.t, 3), "now_ms": x.now_ms,
            "events": x.events, "trades": len(x.ledger), "markets": len(x.markets),
            "open_markets": len(x.tradable), "connections": len(self.feed.conns),
            "ws_connections_total": self.feed.connections_total, "subscribed_assets": len(self.feed.subs),
            "ws_messages_out": self.feed.messages_out, "ws_dropped_slow": self.feed.dropped_slow,
            "engine_lag_s": round(self.engine_lag, 3), "port": self.port,
        })

    def _ledger_window(self, request: web.Request) -> tuple[int, int, int]:
        """(since, end, total) of a ledger read from ?since=i&limit=n; ValueError on bad numbers."""
        since = int(request.query.get("since", "0"))
        limit = int(request.query.get("limit", str(1 << 40)))
        total = len(self.exchange.ledger)
        since = max(0, min(since, total))
        return since, min(total, since + max(0, limit)), total

    async def _ledger(self, request: web.Request) -> web.Response:
        """{"trades": [...], "next": i, "total": n}: trades[since : since+limit] in publish order."""
        led = self.exchange.ledger
        try:
            since, end, total = self._ledger_window(request)
        except ValueError:
            return _json(400, {"error": "since and limit must be integers"})
        markets = self.exchange.markets
        # Formatting millions of entries takes seconds: do it in a thread so the engine and the
        # WebSocket writers keep running (the GIL is shared, the event loop is not blocked).
        text = await asyncio.get_running_loop().run_in_executor(None, led.json_range, since, end, markets)
        return web.Response(text='{"trades":%s,"next":%d,"total":%d}' % (text, end, total),
                            content_type="application/json")

    async def _ledger_tsv(self, request: web.Request) -> web.Response:
        """trades[since : since+limit] as tab-separated lines (Ledger.tsv_range); headers
        X-Ledger-Next and X-Ledger-Total say where the next read starts and how many exist."""
        try:
            since, end, total = self._ledger_window(request)
        except ValueError:
            return _json(400, {"error": "since and limit must be integers"})
        led, markets = self.exchange.ledger, self.exchange.markets
        body = await asyncio.get_running_loop().run_in_executor(None, led.tsv_range, since, end, markets)
        return web.Response(body=body, content_type="text/tab-separated-values",
                            headers={"X-Ledger-Next": str(end), "X-Ledger-Total": str(total)})

    async def _faults_get(self, request: web.Request) -> web.Response:
        return _json(200, {"faults": self.faults.describe()})

    async def _faults_delete(self, request: web.Request) -> web.Response:
        return _json(200, {"cleared": self.faults.clear()})

    async def _faults_post(self, request: web.Request) -> web.Response:
        """Body: a fault spec, a list of them, or {"clear": true [, surface, kind]}."""
        try:
            body = await request.json()
        except ValueError:
            return _json(400, {"error": "body must be JSON"})
        if isinstance(body, dict) and body.get("clear"):
            return _json(200, {"cleared": self.faults.clear(body.get("surface"), body.get("kind")),
                               "faults": self.faults.describe()})
        specs = body if isinstance(body, list) else [body]
        added = []
        try:
            for spec in specs:
                f = self.faults.add(spec)
                added.append(f)
        except FaultError as e:
            for f in added:
                self.faults.items.remove(f)
            return _json(400, {"error": str(e)})
        effects = [self._immediate(f) for f in added]
        return _json(200, {"added": [f.describe(time.monotonic()) for f in added], "effects": effects,
                           "faults": self.faults.describe()})

    def _immediate(self, f) -> dict:
        """Faults that act now rather than per request: drops, stalls, huge frames, listener down."""
        p = f.params
        if f.surface == "ws" and f.kind == "drop":
            n = self.feed.drop_all(clean=bool(p.get("clean")))
            if p.get("every"):
                self.tasks.append(asyncio.get_running_loop().create_task(self._drop_every(f)))
            else:
                self.faults.items.remove(f)
            return {"dropped": n}
        if f.surface == "ws" and f.kind == "stall":
            return {"stalled": self.feed.stall_all(float(p.get("seconds", 5.0)))}
        if f.surface == "ws" and f.kind == "huge_frame":
            n = self.feed.huge_frame(int(p.get("bytes", 4 * 1024 * 1024)))
            self.faults.items.remove(f)
            return {"sent_to": n}
        if f.kind == "listener_down":
            seconds = float(p.get("seconds", 5.0))
            self.tasks.append(asyncio.get_running_loop().create_task(self._listener_down(seconds)))
            return {"down_for": seconds}
        return {}

    async def _drop_every(self, f) -> None:
        every = max(0.05, float(f.params["every"]))
        while True:
            await asyncio.sleep(every)
            if f not in self.faults.active():
                return
            f.fired += 1
            self.feed.drop_all(clean=bool(f.params.get("clean")))

    async def _listener_down(self, seconds: float) -> None:
        """Close the listening socket (new connections are refused), reopen it on the same port."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        await asyncio.sleep(seconds)
        if not self.stopping.is_set():
            await self._listen()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(50):
            try:
                self.listener = await loop.create_server(self.runner.server, self.opts.host, self.port,
                                                         reuse_address=True, backlog=512)
                break
            except OSError:
                if attempt == 49 or self.port == 0:
                    raise
                await asyncio.sleep(0.1)
        self.port = self.listener.sockets[0].getsockname()[1]

    # -- engine ----------------------------------------------------------------------------------------
    async def engine(self) -> None:
        """Release due events every tick; at most `budget` per pass so HTTP stays responsive."""
        x, feed, tick = self.exchange, self.feed, self.opts.tick
        budget = max(2000, int(self.opts.trade_rate * tick * 4))
        start = time.monotonic()
        try:
            while not self.stopping.is_set():
                target = time.monotonic() - start
                done = x.advance(target, int(time.time() * 1000), budget)
                feed.flush()
                self.engine_lag = max(0.0, target - x.t)
                await asyncio.sleep(0 if done >= budget else tick)
        except Exception:
            # An exchange that silently stops publishing would look like a quiet market:
            # say why and exit non-zero instead.
            log.exception("polysim engine failed; exiting")
            self.failed = True
            self.stopping.set()

    async def serve(self, ready=None) -> None:
        self.runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await self.runner.setup()
        await self._listen()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.tasks.append(loop.create_task(self.engine()))
        self.tasks.append(loop.create_task(self.feed.watchdog()))
        print(f"polysim listening on http://{self.opts.host}:{self.port}", flush=True)
        if ready is not None:
            ready(self)
        await self.stopping.wait()
        if self.listener is not None:
            self.listener.close()
        await self.feed.close_all()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.runner.cleanup()


def _ids(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _body_ids(body) -> list[str]:
    if not isinstance(body, list):
        return []
    return [i["token_id"] for i in body if isinstance(i, dict) and isinstance(i.get("token_id"), str)]


def run(opts: Options) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    server = Server(opts)
    try:
        asyncio.run(server.serve())
    except OSError as e:
        print(f"polysim: cannot listen on {opts.host}:{opts.port}: {e.strerror or e}", file=sys.stderr)
        return 69
    return 70 if server.failed else 0
