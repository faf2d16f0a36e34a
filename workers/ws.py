"""One market-channel WebSocket, driven by the caller's loop (no threads, no callbacks).

websocket-client's `create_connection` + frame reads in our own loop: its
`run_forever`/`on_message` machinery swallows exceptions and runs its own timers
(DESIGN §2). A `Connection` is a small state machine on an injected monotonic clock:

    CLOSED --connect()--> OPEN --fail(reason)--> CLOSED (next attempt after a jittered backoff)

While OPEN the owner calls, in any order:
  - `read()` when the socket is readable (the owner multiplexes many Connections with
    `selectors` on `fileno()`); it returns every complete text message already buffered;
  - `tick(now)` at least every second: sends the text `PING` every `ping_interval`,
    fails the connection when the `PONG` is late (`pong_timeout`) or when no data at all
    arrived for `stall_timeout` (a socket can stay open and silent), and resets the
    backoff once the connection has been healthy for `stable_after`. Given `read_at`
    (when the owner last read the socket to the end), a deadline is missed only once
    the socket was read after it: a busy owner is not a silent exchange.
Every blocking call has a timeout: the handshake `connect_timeout`, a read that has
started a frame `read_timeout`.

Why our own frame reader (BufferedWebSocket.messages): websocket-client's costs ~11 us
of CPU a frame (its UTF-8 check, off here, capped one socket near 15k messages/s:
DESIGN §7) and asks the socket for exactly the bytes it needs, two syscalls a frame at
least. The exchange sends mostly one event per frame, so that was most of what a
message cost. Ours reads up to 256 KiB at a time and cuts whole frames out of memory;
the library keeps the handshake, the (masked) sends and the close. Buffered bytes are
invisible to select(), so read() drains the buffer completely before it returns.
`max_message` (256 MiB, far above the initial dump, the largest real frame with one
`book` per asset) is checked against each frame's length header before its payload
is read, so a corrupt or hostile length fails the connection instead of filling memory.
"""

from __future__ import annotations

import logging
import random
import select
import ssl
import time
from dataclasses import dataclass
from typing import Callable

import websocket
from websocket import ABNF, WebSocket

log = logging.getLogger(__name__)

CLOSED, OPEN = "CLOSED", "OPEN"
READ_CHUNK = 256 * 1024


class Backoff:
    """Jittered exponential backoff: initial doubling to cap; never gives up."""

    def __init__(self, initial: float = 0.5, cap: float = 30.0, rng: Callable[[], float] = random.random):
        self.initial, self.cap, self.rng = initial, cap, rng
        self.attempt = 0

    def next(self) -> float:
        """The next delay: uniform in [d/2, d] where d = initial * 2**attempt, capped."""
        delay = min(self.cap, self.initial * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempt = 0


class BufferedWebSocket(WebSocket):
    """WebSocket whose incoming frames are parsed from a 256 KiB read buffer by `messages()`.

    websocket-client still does the handshake, every send (masked, as a client must)
    and the close; reading goes through `messages()`, which costs about a tenth of the
    library's frame reader (11 us of CPU a frame there, most of a collector's cost per
    message when the exchange sends one event per frame, as it mostly does). A server
    frame is never masked and uses no reserved bit (no extension is negotiated): either
    fails the connection, as does a payload over the limit, refused by its header
    before it is read.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._limit = 256 * 1024 * 1024
        self._fragments: list[bytes] | None = None  # a fragmented data message being assembled
        self._fragment_op = 0
        self._fragment_size = 0
        self._error: Exception | None = None

    def set_max_frame(self, limit: int) -> None:
        self._limit = limit

    def buffered(self) -> bool:
        """True when bytes are waiting in memory (ours or TLS's), invisible to select()."""
        if self._rpos < len(self._rbuf) or self._error is not None:
            return True
        sock = self.sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def messages(self) -> list[tuple[int, bytes]]:
        """Every complete message and control frame the buffer holds, as (opcode, payload).

        In order: parse whole frames from the buffer; when none was complete, read the
        socket (the library's recv: socket timeout, EOF and resets raise its exceptions)
        and parse again, until at least one frame is complete; keep what is left of a
        frame for the next call. Fragmented data messages come out whole; control frames
        (ping, pong, close) as they are. Raises WebSocketProtocolException or
        WebSocketPayloadException on a frame no server may send.
        """
        if self._error is not None:  # met after the frames handed over last time
            err, self._error = self._error, None
            raise err
        out: list[tuple[int, bytes]] = []
        buf, pos = self._rbuf, self._rpos
        while True:
            try:
                pos, need = self._parse(buf, pos, out)
            except websocket.WebSocketException as err:
                if not out:
                    raise
                self._error = err  # the frames before it were published: hand them over first
                break
            if out:
                break
            # No complete frame: read at least what the next one still lacks, joined once.
            chunks, have = [buf[pos:]], len(buf) - pos
            while True:
                chunk = WebSocket._recv(self, READ_CHUNK)
                chunks.append(chunk)
                have += len(chunk)
                if have >= need:
                    break
            buf, pos = b"".join(chunks), 0
        self._rbuf, self._rpos = buf, pos
        return out

    def _parse(self, buf: bytes, pos: int, out: list) -> tuple[int, int]:
        """Append the complete frames of buf[pos:] to out; returns (new pos, bytes the
        next frame needs from pos, or pos's frame header's minimum when unknown). A frame
        no server may send raises; out keeps the frames before it."""
        n = len(buf)
        while True:
            if n - pos < 2:
                return pos, 2
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    return pos, 4
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    return pos, 10
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if b1 & 0x80:
                raise websocket.WebSocketProtocolException("masked frame from the server")
            if b0 & 0x70:
                raise websocket.WebSocketProtocolException("reserved bits set (no extension was negotiated)")
            if length > self._limit or self._fragment_size + length > self._limit:
                raise websocket.WebSocketPayloadException(f"frame of {length} bytes over max_message ({self._limit})")
            end = pos + head + length
            if end > n:
                return pos, head + length
            payload = buf[pos + head:end]
            pos = end
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode >= 8:  # close, ping, pong: never fragmented, at most 125 bytes
                if opcode not in (ABNF.OPCODE_CLOSE, ABNF.OPCODE_PING, ABNF.OPCODE_PONG) or not fin or length > 125:
                    raise websocket.WebSocketProtocolException(f"bad control frame (opcode {opcode})")
                out.append((opcode, payload))
            elif opcode == ABNF.OPCODE_CONT:
                if self._fragments is None:
                    raise websocket.WebSocketProtocolException("continuation frame without a message")
                self._fragments.append(payload)
                self._fragment_size += length
                if fin:
                    out.append((self._fragment_op, b"".join(self._fragments)))
                    self._fragments, self._fragment_size = None, 0
            elif opcode in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY):
                if self._fragments is not None:
                    raise websocket.WebSocketProtocolException("new message inside a fragmented one")
                if fin:
                    out.append((opcode, payload))
                else:
                    self._fragments, self._fragment_op, self._fragment_size = [payload], opcode, length
            else:
                raise websocket.WebSocketProtocolException(f"unknown opcode {opcode}")


@dataclass(frozen=True)
class WsOptions:
    """Timing and size options of one connection (seconds; scaled down in tests)."""

    ping_interval: float = 10.0
    pong_timeout: float = 10.0
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_after: float = 30.0
    max_message: int = 256 * 1024 * 1024


class ConnectionFailed(Exception):
    """The connection broke (reason in str()); `texts` are the messages read before it did."""

    def __init__(self, reason: str, texts: list[str] | None = None):
        super().__init__(reason)
        self.texts = texts or []


class Rx:
    """What one socket (one connect()) delivered, for its owner's gap bookkeeping.

    `last_wall` is the wall time of its last byte-carrying frame; `newest_ms` the
    newest exchange timestamp its owner read from it (note()).
    """

    __slots__ = ("last_wall", "newest_ms")

    def __init__(self, wall: float):
        self.last_wall = wall
        self.newest_ms = 0

    def note(self, ms: int) -> None:
        if ms > self.newest_ms:
            self.newest_ms = ms

    def vouched(self) -> float:
        """The wall time up to which this socket delivered what the exchange published:
        the newest exchange time read, capped by the last data; 0.0 before anything
        timestamped was read.

        Receipt time alone over-promises when the reader lags: messages still in the
        kernel buffer or the exchange's send queue carry earlier timestamps, and a drop
        or a kill -9 now loses them. Whatever is not read yet was published after the
        newest message read, except for the exchange's reordering (~100 ms), which the
        backfill margin covers.
        """
        return min(self.last_wall, self.newest_ms / 1000.0) if self.newest_ms else 0.0


def _judged(deadline: float, now: float, read_at: float | None, grace: float) -> bool:
    """Whether a deadline passed at `deadline` is missed now (see Connection.tick)."""
    return read_at is None or read_at > deadline or now > deadline + grace


class Connection:
    """One market-channel socket: connect, read, heartbeat, fail, back off."""

    def __init__(self, url: str, options: WsOptions = WsOptions(), *, index: int = 0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 connector: Callable[..., WebSocket] = websocket.create_connection):
        self.url = url
        self.options = options
        self.index = index
        self.clock, self.wall = clock, wall
        self.connector = connector
        self.backoff = Backoff(options.backoff_initial, options.backoff_max)
        self.ws: BufferedWebSocket | None = None
        self.state = CLOSED
        self.next_attempt = 0.0  # monotonic time of the next connect attempt
        self.opened_at = 0.0
        self.last_rx = 0.0  # monotonic time of the last byte-carrying frame (any kind)
        self.rx = Rx(0.0)  # this socket's last data (wall) and newest exchange time read
        self.next_ping = 0.0
        self.pong_due: float | None = None
        self.reconnects = 0
        self.messages = 0
        self.last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------
    def fileno(self) -> int:
        return self.ws.sock.fileno() if self.ws is not None and self.ws.sock is not None else -1

    def connect(self) -> None:
        """CLOSED -> OPEN: handshake within connect_timeout. Raises ConnectionFailed (and backs off)."""
        now = self.clock()
        try:
            ws = self.connector(
                self.url, timeout=self.options.connect_timeout, class_=BufferedWebSocket,
                skip_utf8_validation=True, enable_multithread=False,
            )
            ws.settimeout(self.options.read_timeout)
            ws.set_max_frame(self.options.max_message)
        except Exception as err:  # refused, reset, 429 on the upgrade, timeout...
            self._closed(f"connect: {type(err).__name__}: {err}", now)
            raise ConnectionFailed(self.last_error) from None
        self.ws = ws
        self.state = OPEN  # CLOSED -> OPEN
        self.opened_at = self.last_rx = now
        self.rx = Rx(self.wall())
        self.next_ping = now + self.options.ping_interval
        self.pong_due = None

    def fail(self, reason: str) -> None:
        """OPEN -> CLOSED: drop the socket at once (no close handshake: it may be hung)."""
        if self.state == OPEN:
            self.reconnects += 1
        self._closed(reason, self.clock())

    def _closed(self, reason: str, now: float) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.shutdown()
            except Exception:
                pass
        self.state = CLOSED  # OPEN -> CLOSED
        self.last_error = reason[:200]
        self.pong_due = None
        self.next_attempt = now + self.backoff.next()

    def close(self) -> None:
        """For shutdown: send a close frame, drop the socket without waiting for the
        reply (many sockets close in one pass, so stop latency stays bounded), CLOSED."""
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                ws.send_close()
            except Exception:
                pass
            try:
                ws.shutdown()
            except Exception:
                pass
        self.state = CLOSED

    # -- I/O ----------------------------------------------------------------
    def send(self, text: str) -> None:
        """Send one text frame. Raises ConnectionFailed (after failing the connection)."""
        if self.ws is None:
            raise ConnectionFailed("not connected")
        try:
            self.ws.send(text)
        except Exception as err:
            self.fail(f"send: {type(err).__name__}: {err}")
            raise ConnectionFailed(self.last_error) from None

    def read(self) -> list[str]:
        """Every complete text message available now (at least one frame is read).

        Protocol pings are answered by the library; protocol pongs and our PONG text
        count as traffic. Raises ConnectionFailed on close, EOF, timeout or a bad frame,
        carrying the messages read before it (they were published: they count).
        """
        ws = self.ws
        if ws is None:
            raise ConnectionFailed("not connected")
        out: list[str] = []
        try:
            while True:
                for opcode, data in ws.messages():
                    if opcode == ABNF.OPCODE_TEXT or opcode == ABNF.OPCODE_BINARY:
                        out.append(data.decode("utf-8", "replace"))
                    elif opcode == ABNF.OPCODE_PING:
                        ws.pong(data)
                    elif opcode == ABNF.OPCODE_CLOSE:
                        raise ConnectionFailed("closed by server")
                if not ws.buffered():
                    break
        except ConnectionFailed as err:
            self._note_rx(out)
            self.fail(str(err))
            raise ConnectionFailed(str(err), out) from None
        except (websocket.WebSocketException, OSError, ValueError) as err:
            self._note_rx(out)
            self.fail(f"read: {type(err).__name__}: {err}")
            raise ConnectionFailed(self.last_error, out) from None
        self._note_rx(out)
        return out

    def _note_rx(self, out: list[str]) -> None:
        self.last_rx = self.clock()
        self.rx.last_wall = self.wall()
        self.messages += len(out)

    def got_pong(self) -> None:
        self.pong_due = None

    def overdue(self, now: float) -> bool:
        """A PONG or data deadline has passed (tick() may fail the connection)."""
        return (self.pong_due is not None and now > self.pong_due) or now - self.last_rx > self.options.stall_timeout

    def unread(self) -> bool:
        """Data waiting for read(): in our buffer or on the socket."""
        ws = self.ws
        if ws is None or ws.sock is None:
            return False
        if ws.buffered():
            return True
        try:
            return bool(select.select([ws.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def tick(self, now: float | None = None, read_at: float | None = None) -> None:
        """Heartbeat and deadlines while OPEN. Raises ConnectionFailed when one is missed.

        `read_at`: when the owner last read the socket to the end (None: do not ask). A
        missed deadline counts once the socket was read after it: an owner whose loop
        was busy (a slow database call) has the PONG or the data unread, and that is
        not the exchange's fault. Past the deadline plus its own length it counts
        whatever was read (a reader that far behind reconnects and backfills).
        """
        if self.state != OPEN:
            return
        now = self.clock() if now is None else now
        opts = self.options
        if (self.pong_due is not None and now > self.pong_due
                and _judged(self.pong_due, now, read_at, opts.pong_timeout)):
            self.fail(f"no PONG within {opts.pong_timeout:g}s")
            raise ConnectionFailed(self.last_error)
        if (now - self.last_rx > opts.stall_timeout
                and _judged(self.last_rx + opts.stall_timeout, now, read_at, opts.stall_timeout)):
            self.fail(f"stalled: no data for {opts.stall_timeout:g}s")
            raise ConnectionFailed(self.last_error)
        if now >= self.next_ping:
            self.next_ping = now + opts.ping_interval
            if self.pong_due is None:
                self.pong_due = now + opts.pong_timeout
            self.send("PING")
        if self.backoff.attempt and now - self.opened_at >= opts.stable_after:
            self.backoff.reset()

    def status(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        return {
            "connected": self.state == OPEN,
            "last_message_age": round(now - self.last_rx, 1) if self.last_rx else None,
            "reconnects": self.reconnects,
        }

