"""Feed: the set of market-channel sockets of one process, multiplexed with `selectors`.

Tokens are placed on connections holding at most `assets_per_socket` each (a token
stays on its connection for the process's life, so a transaction's fills always
arrive through one socket, in order). The Feed, driven by the owner's loop:
  - `set_tokens(tokens)` applies a new followed set live: unsubscribe operations for
    tokens that left, subscribe operations (at most `ids_per_frame` ids a frame) for
    new ones on open connections, new connections when the others are full. Given a
    mapping token -> condition id, new tokens are placed in condition id order, so
    both tokens of a market share a socket: a socket's gap then names each of its
    markets once, and its backfill needs half the Data API requests;
  - `tick()` sends heartbeats, enforces the PONG and stall deadlines (once the
    sockets were read past them: a busy owner is not a silent exchange), and opens
    due connections one at a time, `connect_stagger` apart (a burst of upgrades
    draws HTTP 429 from the exchange's edge);
  - `poll(timeout)` waits on every open socket (and an optional wake fd) at once and
    returns the text messages read, with their connection (also those read just
    before a socket broke).
It records what the owner must know about coverage in `events` (drained by the owner):
  ("live", conn, tokens, at)          subscribed on an open socket at wall time `at`:
                                      trades from then on arrive here;
  ("down", conn, tokens, rx, why)     the socket failed; its tokens may have missed
                                      trades since `rx.vouched()` (workers.ws.Rx: the
                                      newest exchange time the owner read from that
                                      socket, noted by the owner as it parses, so it
                                      is read when the event is applied).
Subscriptions do not survive a reconnect, so each connect re-sends its full set.
"""

from __future__ import annotations

import json
import logging
import selectors
import time
from typing import Callable, Iterable, Mapping

from workers.ws import OPEN, Connection, ConnectionFailed, WsOptions

log = logging.getLogger(__name__)


def subscribe_frames(ids: list[str], *, initial: bool, per_frame: int = 100) -> list[str]:
    """The frames that subscribe ids: the first of a fresh connection carries `type`."""
    frames = []
    for i in range(0, len(ids), per_frame):
        chunk = ids[i:i + per_frame]
        if initial and i == 0:
            msg = {"assets_ids": chunk, "type": "market", "custom_feature_enabled": True}
        else:
            msg = {"operation": "subscribe", "assets_ids": chunk, "custom_feature_enabled": True}
        frames.append(json.dumps(msg, separators=(",", ":")))
    return frames


def unsubscribe_frames(ids: list[str], per_frame: int = 100) -> list[str]:
    return [json.dumps({"operation": "unsubscribe", "assets_ids": ids[i:i + per_frame]}, separators=(",", ":"))
            for i in range(0, len(ids), per_frame)]


class Feed:
    """Many Connections, one selector, no threads."""

    def __init__(self, url: str, options: WsOptions = WsOptions(), *, assets_per_socket: int = 400,
                 ids_per_frame: int = 100, connect_stagger: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 connection: Callable[..., Connection] = Connection):
        if assets_per_socket < 1 or ids_per_frame < 1:
            raise ValueError("assets_per_socket and ids_per_frame must be >= 1")
        self.url = url
        self.options = options
        self.assets_per_socket = assets_per_socket
        self.ids_per_frame = ids_per_frame
        self.connect_stagger = connect_stagger
        self.clock, self.wall = clock, wall
        self._new_connection = connection
        self.conns: list[Connection] = []
        self.assets: dict[int, set[str]] = {}  # conn index -> tokens placed on it
        self.subscribed: dict[int, set[str]] = {}  # conn index -> tokens sent on the current socket
        self.where: dict[str, int] = {}  # token -> conn index
        self.events: list[tuple] = []
        self.selector = selectors.DefaultSelector()
        self._fds: dict[int, int] = {}  # conn index -> registered fd
        self._wake_fd = -1
        self._next_connect = 0.0
        self._read_at = float("-inf")  # clock time of the last poll (tick() judges deadlines by it)

    # -- followed set ---------------------------------------------------------
    def set_tokens(self, tokens: Iterable[str] | Mapping[str, str | None]) -> tuple[list[str], list[str]]:
        """Apply the wanted token set (or token -> condition id); returns (added, removed)."""
        wanted = set(tokens)
        group = tokens.get if isinstance(tokens, Mapping) else (lambda token: None)
        removed = [t for t in self.where if t not in wanted]
        added = sorted((t for t in wanted if t not in self.where), key=lambda t: (group(t) or "", t))
        gone: dict[int, list[str]] = {}
        for token in removed:
            index = self.where.pop(token)
            self.assets[index].discard(token)
            if token in self.subscribed[index]:
                self.subscribed[index].discard(token)
                gone.setdefault(index, []).append(token)
        for index, ids in gone.items():
            self._send_all(self.conns[index], unsubscribe_frames(ids, self.ids_per_frame))
        placed: dict[int, list[str]] = {}
        for token in added:
            index = self._room()
            self.assets[index].add(token)
            self.where[token] = index
            placed.setdefault(index, []).append(token)
        for index, ids in placed.items():
            conn = self.conns[index]
            if conn.state == OPEN:
                self._subscribe(conn, ids, initial=False)
        return added, removed

    def _room(self) -> int:
        for conn in self.conns:
            if len(self.assets[conn.index]) < self.assets_per_socket:
                return conn.index
        index = len(self.conns)
        conn = self._new_connection(self.url, self.options, index=index, clock=self.clock, wall=self.wall)
        self.conns.append(conn)
        self.assets[index] = set()
        self.subscribed[index] = set()
        return index

    def _subscribe(self, conn: Connection, ids: list[str], *, initial: bool) -> None:
        at = self.wall()
        if self._send_all(conn, subscribe_frames(ids, initial=initial, per_frame=self.ids_per_frame)):
            self.subscribed[conn.index].update(ids)
            self.events.append(("live", conn, list(ids), at))

    def _send_all(self, conn: Connection, frames: list[str]) -> bool:
        try:
            for frame in frames:
                conn.send(frame)
        except ConnectionFailed as err:
            self._failed(conn, str(err))
            return False
        return True

    # -- connection lifecycle -------------------------------------------------
    def _failed(self, conn: Connection, reason: str) -> None:
        """A connection failed (already CLOSED): unregister, report its tokens down."""
        fd = self._fds.pop(conn.index, None)
        if fd is not None:
            try:
                self.selector.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
        tokens = list(self.subscribed[conn.index])
        self.subscribed[conn.index] = set()
        if tokens:
            self.events.append(("down", conn, tokens, conn.rx, reason))
        log.warning("ws %d: %s (reconnect in %.1fs)", conn.index, reason, max(0.0, conn.next_attempt - self.clock()))

    def _open(self, conn: Connection) -> None:
        try:
            conn.connect()
        except ConnectionFailed as err:
            log.warning("ws %d: %s", conn.index, err)
            return
        fd = conn.fileno()
        self.selector.register(fd, selectors.EVENT_READ, conn)
        self._fds[conn.index] = fd
        ids = sorted(self.assets[conn.index])
        self._subscribe(conn, ids, initial=True)

    def set_wake_fd(self, fd: int) -> None:
        """A pipe whose readability ends poll() early (the Worker's stop() writes to it)."""
        self._wake_fd = fd
        self.selector.register(fd, selectors.EVENT_READ, None)

    def tick(self) -> None:
        """Deadlines, heartbeats, and at most one due connect (stagger).

        A connection past a deadline is judged by what the last poll() read: with data
        still unread on it (the owner's loop was busy: a followed-set read of 100,000
        rows takes seconds on a loaded machine) the verdict waits for the next poll.
        """
        now = self.clock()
        for conn in self.conns:
            if conn.state == OPEN:
                read_at = self._read_at
                if conn.overdue(now) and conn.unread():
                    read_at = float("-inf")
                try:
                    conn.tick(now, read_at)
                except ConnectionFailed as err:
                    self._failed(conn, str(err))
        if now < self._next_connect:
            return
        for conn in self.conns:
            if conn.state != OPEN and self.assets[conn.index] and now >= conn.next_attempt:
                self._next_connect = now + self.connect_stagger
                self._open(conn)
                break

    def next_deadline(self) -> float:
        """Monotonic time by which tick() must run next."""
        deadline = self.clock() + 1.0
        for conn in self.conns:
            if conn.state == OPEN:
                deadline = min(deadline, conn.next_ping, conn.pong_due or deadline,
                               conn.last_rx + self.options.stall_timeout)
            elif self.assets[conn.index]:
                deadline = min(deadline, max(conn.next_attempt, self._next_connect))
        return deadline

    def poll(self, timeout: float) -> list[tuple[Connection, list[str]]]:
        """Wait up to timeout for any socket; read what is ready. Never raises on a socket error."""
        out = []
        try:
            ready = self.selector.select(max(0.0, timeout))
        except InterruptedError:
            return out
        self._read_at = self.clock()  # what had arrived by now is read below
        for key, _ in ready:
            conn = key.data
            if conn is None:  # the wake fd: the owner drains it
                continue
            if conn.state != OPEN:
                continue
            try:
                texts = conn.read()
            except ConnectionFailed as err:
                if err.texts:  # read before the socket broke: the owner handles them first
                    out.append((conn, err.texts))
                self._failed(conn, str(err))
                continue
            if texts:
                out.append((conn, texts))
        return out

    def fail(self, conn: Connection, reason: str) -> None:
        """Drop a connection on the owner's behalf (e.g. it sent garbage the owner cannot trust)."""
        if conn.state == OPEN:
            conn.fail(reason)
            self._failed(conn, reason)

    def close(self) -> None:
        for conn in self.conns:
            fd = self._fds.pop(conn.index, None)
            if fd is not None:
                try:
                    self.selector.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
            conn.close()
        self.selector.close()

    def status(self) -> dict:
        now = self.clock()
        return {
            "sockets": len(self.conns),
            "sockets_connected": sum(1 for c in self.conns if c.state == OPEN),
            "reconnects": sum(c.reconnects for c in self.conns),
            "socket_status": [
                [c.index, int(c.state == OPEN), round(now - c.last_rx, 1) if c.last_rx else None, c.reconnects,
                 len(self.assets[c.index])]
                for c in self.conns[:40]
            ],
        }
