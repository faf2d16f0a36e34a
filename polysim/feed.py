"""Feed: the market-channel WebSocket at /ws/market (polymarket-api.md §5).

Per connection, in order:
  1. The client sends {"assets_ids": [...], "type": "market",
     "custom_feature_enabled": bool, "initial_dump": bool}; polysim answers with
     one array frame holding a `book` per known open asset (initial dump), then
     streams that asset's events. Later {"operation": "subscribe"|"unsubscribe",
     "assets_ids": [...]} frames change the set live (a subscribe dumps too).
  2. Text `PING` is answered with text `PONG`. A connection that sent no PING
     for `ping_timeout` seconds is closed (protocol-level pings do not count).
  3. Real limits: a subscribe frame with more than `max_frame_ids` ids closes
     the connection; assets beyond `max_dump_assets` on one connection get no
     initial snapshot (their deltas still flow).
  4. With custom_feature_enabled the connection also gets `best_bid_ask` for its
     assets and the global `new_market` / `market_resolved` announcements.

Messages are serialized once by the exchange and fanned out as strings. Each
connection has a writer task that takes everything queued since its last send
and ships one frame: a bare object when there is one message, a JSON array of up
to `batch_max` otherwise (so the frame rate stays low when the message rate is
high). A client more than `max_pending` messages behind is dropped, as a real
server drops a consumer that cannot keep up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import WSMsgType, web

from polysim.exchange import Exchange
from polysim.faults import Faults
from polysim.options import Options

log = logging.getLogger("polysim.feed")

UNKNOWN_EVENT = '{"event_type":"polysim_unknown_event","market":"0x00","payload":{"note":"ignore me"},"timestamp":"%d"}'
WRITE_BUFFER = 8 * 1024 * 1024  # bytes a connection's transport may hold before its writer waits (small next to max_pending)
MALFORMED = ('{"event_type":"last_trade_price","market":"0x', "NOT JSON AT ALL", '[{"event_type":"book",')


class Conn:
    """One client connection: its subscriptions and its outgoing queue."""

    __slots__ = ("ws", "request", "assets", "custom", "last_ping", "pending", "frames", "wake",
                 "stalled_until", "closed", "sent_messages", "sent_frames", "writer")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request):
        self.ws = ws
        self.request = request
        self.assets: set[str] = set()
        self.custom = False
        self.last_ping = time.monotonic()
        self.pending: list[str] = []
        self.frames: list[str] = []  # ready-made frames (dumps), sent before `pending`
        self.wake = asyncio.Event()
        self.stalled_until = 0.0
        self.closed = False
        self.sent_messages = 0
        self.sent_frames = 0
        self.writer: asyncio.Task | None = None


class Feed:
    """Subscription registry + fan-out; implements the exchange's Sink."""

    def __init__(self, opts: Options, faults: Faults):
        self.opts = opts
        self.faults = faults
        self.exchange: Exchange | None = None
        self.subs: dict[str, set[Conn]] = {}
        self.conns: set[Conn] = set()
        self.dirty: set[Conn] = set()
        self.dropped_slow = 0
        self.messages_out = 0
        self.connections_total = 0  # WebSocket upgrades accepted since start

    # -- Sink --------------------------------------------------------------------------
    def wants(self, asset: str) -> bool:
        return asset in self.subs

    def emit(self, assets: tuple[str, ...], text: str, custom_only: bool = False) -> None:
        if len(assets) == 1:
            targets = self.subs.get(assets[0])
            if not targets:
                return
        else:
            targets = set()
            for a in assets:
                s = self.subs.get(a)
                if s:
                    targets |= s
        for c in targets:
            if custom_only and not c.custom:
                continue
            c.pending.append(text)
            self.dirty.add(c)

    def emit_global(self, text: str) -> None:
        for c in self.conns:
            if c.custom:
                c.pending.append(text)
                self.dirty.add(c)

    def flush(self) -> None:
        """Wake the writers of connections with something queued (called once per engine tick)."""
        limit = self.opts.max_pending
        # Swap the set out first: dropping a slow consumer forgets it, which
        # removes it from self.dirty while we iterate.
        dirty, self.dirty = self.dirty, set()
        for c in dirty:
            if len(c.pending) > limit and not c.closed:
                self.dropped_slow += 1
                log.warning("dropping a slow WebSocket consumer (%d messages behind)", len(c.pending))
                c.pending.clear()
                self._abort(c)
                continue
            c.wake.set()

    # -- connection lifecycle --------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=64 * 1024 * 1024, compress=False)
        await ws.prepare(request)
        if request.transport is not None:
            # Let a few array frames queue in the transport before the writer waits for the
            # socket: with asyncio's 64 KiB default, each frame of 500 trades waits for a drain,
            # i.e. for the next turn of a loop the engine keeps busy.
            request.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        c = Conn(ws, request)
        self.conns.add(c)
        self.connections_total += 1
        c.writer = asyncio.get_running_loop().create_task(self._writer(c))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(c, msg.data)
                elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._forget(c)
            c.wake.set()
        return ws

    def _forget(self, c: Conn) -> None:
        c.closed = True
        self.conns.discard(c)
        self.dirty.discard(c)
        for a in c.assets:
            s = self.subs.get(a)
            if s is not None:
                s.discard(c)
                if not s:
                    del self.subs[a]
        c.assets.clear()

    def _abort(self, c: Conn) -> None:
        """Drop the TCP connection without a close frame (what a network drop looks like)."""
        self._forget(c)
        transport = c.request.transport
        if transport is not None:
            transport.abort()
        c.wake.set()

    async def _close(self, c: Conn, code: int, reason: str) -> None:
        self._forget(c)
        c.wake.set()
        try:
            await asyncio.wait_for(c.ws.close(code=code, message=reason.encode()), 2.0)
        except (asyncio.TimeoutError, ConnectionError):
            self._abort(c)

    # -- inbound -----------------------------------------------------------------------------
    async def _on_text(self, c: Conn, data: str) -> None:
        if data == "PING":
            c.last_ping = time.monotonic()
            if c.stalled_until > time.monotonic() or self.faults.pick("ws", ("pong_withheld",)):
                return
            await c.ws.send_str("PONG")
            return
        try:
            msg = json.loads(data)
        except ValueError:
            return  # the real server ignores junk text
        if not isinstance(msg, dict):
            return
        ids = msg.get("assets_ids")
        if not isinstance(ids, list):
            ids = []
        ids = [a for a in ids if isinstance(a, str)]
        if len(ids) > self.opts.max_frame_ids:
            # The real server closes a connection whose subscribe frame is too large.
            await self._close(c, 1009, "subscribe frame too large")
            return
        op = msg.get("operation")
        if op == "unsubscribe":
            self._unsubscribe(c, ids)
            return
        if op == "subscribe" or (op is None and str(msg.get("type", "")).lower() == "market"):
            if "custom_feature_enabled" in msg:
                c.custom = bool(msg.get("custom_feature_enabled"))
            dump = msg.get("initial_dump", True) is not False
            self._subscribe(c, ids, dump)

    def _subscribe(self, c: Conn, ids: list[str], dump: bool) -> None:
        """Register the assets and queue their book dump, in one step (no await in between),
        so every event for them is queued after the dump."""
        x = self.exchange
        new = [a for a in dict.fromkeys(ids) if a not in c.assets]
        books = []
        for a in new:
            c.assets.add(a)
            self.subs.setdefault(a, set()).add(c)
            hit = x.by_token.get(a)
            # Past max_dump_assets the real server silently skips snapshots (deltas still flow).
            if (dump and hit is not None and hit[0].tradable(x.now_ms)
                    and len(c.assets) <= self.opts.max_dump_assets):
                books.append(x.book_text(hit[0], hit[1], initial=True))
        if books:
            c.frames.append("[" + ",".join(books) + "]")
            c.wake.set()

    def _unsubscribe(self, c: Conn, ids: list[str]) -> None:
        for a in ids:
            if a in c.assets:
                c.assets.discard(a)
                s = self.subs.get(a)
                if s is not None:
                    s.discard(c)
                    if not s:
                        del self.subs[a]

    # -- outbound -------------------------------------------------------------------------------
    async def _writer(self, c: Conn) -> None:
        batch_max = self.opts.batch_max
        faults = self.faults
        try:
            while not c.closed:
                await c.wake.wait()
                c.wake.clear()
                if c.closed:
                    return
                if c.stalled_until > time.monotonic():
                    c.frames.clear()
                    c.pending.clear()  # a stalled exchange socket delivers nothing, ever
                    continue
                frames, c.frames = c.frames, []
                pending, c.pending = c.pending, []
                if faults.items:
                    pending = self._mangle(pending)
                    if faults.pick("ws", ("malformed",)):
                        frames.append(MALFORMED[len(pending) % len(MALFORMED)])
                for f in frames:
                    await c.ws.send_str(f)
                    c.sent_frames += 1
                n = len(pending)
                for i in range(0, n, batch_max):
                    chunk = pending[i:i + batch_max]
                    frame = chunk[0] if len(chunk) == 1 else "[" + ",".join(chunk) + "]"
                    await c.ws.send_str(frame)
                    c.sent_frames += 1
                c.sent_messages += n
                self.messages_out += n
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception:
            # Never leave a socket open with a dead writer: that would be a silent stall.
            log.exception("WebSocket writer failed; dropping the connection")
            self._abort(c)
        finally:
            c.closed = True

    def _mangle(self, pending: list[str]) -> list[str]:
        """unknown_events fault: unknown fields on messages and an unknown event type per batch."""
        if not pending or not self.faults.pick("ws", ("unknown_events",)):
            return pending
        out = ['{"polysim_unknown_field":{"a":[1,2]},' + t[1:] if t.startswith("{") else t for t in pending]
        out.append(UNKNOWN_EVENT % int(time.time() * 1000))
        return out

    # -- faults and housekeeping -----------------------------------------------------------------
    def drop_all(self, clean: bool = False) -> int:
        conns = list(self.conns)
        for c in conns:
            if clean:
                asyncio.get_running_loop().create_task(self._close(c, 1001, "going away"))
            else:
                self._abort(c)
        return len(conns)

    def stall_all(self, seconds: float) -> int:
        until = time.monotonic() + seconds
        for c in self.conns:
            c.stalled_until = until
        return len(self.conns)

    def huge_frame(self, size: int) -> int:
        """Queue one frame of at least `size` bytes of valid `book` messages to each connection."""
        x = self.exchange
        n = 0
        for c in list(self.conns):
            books = []
            for a in list(c.assets)[:50]:
                hit = x.by_token.get(a)
                if hit is not None and hit[0].tradable(x.now_ms):
                    books.append(x.book_text(hit[0], hit[1], initial=True))
            if not books:
                continue
            parts, total, k = [], 0, 0
            while total < size:
                parts.append(books[k % len(books)])
                total += len(parts[-1]) + 1
                k += 1
            c.frames.append("[" + ",".join(parts) + "]")
            c.wake.set()
            n += 1
        return n

    async def watchdog(self) -> None:
        """Close connections that stopped sending PING (checked every second)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for c in list(self.conns):
                if now - c.last_ping > self.opts.ping_timeout:
                    await self._close(c, 1000, "ping timeout")

    async def close_all(self) -> None:
        await asyncio.gather(*(self._close(c, 1001, "server shutdown") for c in list(self.conns)),
                             return_exceptions=True)
