"""A loopback TCP proxy in front of PostgreSQL, to make the database go away and come back.

The shared server on 5432 must keep running for everyone else, so the collectors
of a fault run talk to it through this proxy: `down()` closes the listening
socket and every relayed connection (the collectors see a dead server and
connection refused, exactly as during a PostgreSQL restart), `up()` listens again
on the same port. `upstream_ports()` names the proxy's connections to the server
(pg_stat_activity.client_port), so pg_terminate_backend can target only ours.
One thread, one selector; every socket non-blocking.
"""

from __future__ import annotations

import selectors
import socket
import threading


class Proxy:
    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)):
        self.upstream = upstream
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.port = 0
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.pending: dict[socket.socket, bytearray] = {}  # bytes waiting to be sent TO this socket
        self.upstreams: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.accepted = 0
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="pg-proxy", daemon=True)

    def start(self) -> "Proxy":
        self.up()
        self._thread.start()
        return self

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def up(self) -> None:
        with self.lock:
            if self.listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(128)
            s.setblocking(False)
            self.port = s.getsockname()[1]
            self.listener = s
            self.sel.register(s, selectors.EVENT_READ, "accept")
        self._poke()

    def down(self) -> None:
        """Refuse new connections and cut every relayed one."""
        with self.lock:
            if self.listener is not None:
                self.sel.unregister(self.listener)
                self.listener.close()
                self.listener = None
            for a in list(self.pairs):
                self._close(a)
        self._poke()

    def upstream_ports(self) -> list[int]:
        with self.lock:
            out = []
            for b in self.upstreams:
                try:
                    out.append(b.getsockname()[1])
                except OSError:
                    pass
            return out

    def stop(self) -> None:
        self._stop = True
        self.down()
        self._thread.join(5)

    def _close(self, s: socket.socket) -> None:
        other = self.pairs.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            self.pairs.pop(x, None)
            self.pending.pop(x, None)
            self.upstreams.discard(x)
            try:
                self.sel.unregister(x)
            except (KeyError, ValueError):
                pass
            try:
                x.close()
            except OSError:
                pass

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(0.5):  # noqa: B007
                with self.lock:
                    if key.data == "wake":
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    elif key.data == "accept":
                        self._accept()
                    else:
                        self._relay(key.fileobj, _)

    def _accept(self) -> None:
        if self.listener is None:
            return
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        self.upstreams.add(server)
        for s in (client, server):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pairs[client] = server
        self.pairs[server] = client
        self.sel.register(client, selectors.EVENT_READ, "relay")
        self.sel.register(server, selectors.EVENT_READ, "relay")
        self.accepted += 1

    def _want(self, s: socket.socket) -> None:
        """Read from s unless its peer has bytes queued; write to s while it has some queued."""
        events = 0
        other = self.pairs.get(s)
        if other is not None and not self.pending.get(other):
            events |= selectors.EVENT_READ
        if self.pending.get(s):
            events |= selectors.EVENT_WRITE
        try:
            registered = self.sel.get_key(s)
        except (KeyError, ValueError):
            registered = None
        try:
            if events and registered is None:
                self.sel.register(s, events, "relay")
            elif events and registered.events != events:
                self.sel.modify(s, events, "relay")
            elif not events and registered is not None:
                self.sel.unregister(s)
        except (KeyError, ValueError, OSError):
            pass

    def _relay(self, s: socket.socket, mask: int) -> None:
        """Non-blocking both ways: a stopped peer (SIGSTOP) never stalls the other connections."""
        other = self.pairs.get(s)
        if other is None:
            return
        if mask & selectors.EVENT_WRITE and self.pending.get(s):
            try:
                sent = s.send(self.pending[s])
                del self.pending[s][:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close(s)
                return
        if mask & selectors.EVENT_READ and not self.pending.get(other):
            try:
                data = s.recv(262144)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(s)
                return
            if data:
                try:
                    sent = other.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(s)
                    return
                if sent < len(data):
                    self.pending.setdefault(other, bytearray()).extend(data[sent:])
        self._want(s)
        self._want(other)
