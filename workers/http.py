"""The HTTP client every polling collector uses: the only code here that talks HTTP.

Client.get_json(url, params) / post_json(url, body), in order, per attempt:
  1. stop check: a stopping worker raises Stopping instead of starting a request;
  2. client-side rate limit: wait for a token in the endpoint's bucket and in its
     API's and the global bucket (polymarket-api.md §6), abortable;
  3. the request on this process's requests.Session, with a (connect, read)
     timeout; TLS verification is requests' default and is never turned off;
     the body is read one socket read at a time, decoded (gzip), and the attempt
     fails when it passes `max_body` bytes (not retried: the same answer would
     come again) or the call's `deadline` (a server trickling a byte every few
     seconds never trips the read timeout, and must not hold the collector);
  4. the answer: 2xx with a JSON body -> returned; 429 -> wait Retry-After (or the
     body's retry_after_seconds), and hold the endpoint's bucket for as long;
     5xx, 408, a Cloudflare HTML 403, a connection error, a timeout, a cut or
     non-JSON body -> wait a jittered exponential backoff; any other 4xx (400,
     404 "no orderbook", 422 bad query) -> HttpError at once, no retry;
  5. give up with HttpError after `retries` retries or when the next wait would
     pass `deadline` seconds since the call began.
Latency is recorded per endpoint (throttling on the exchange's side shows up as
latency), with the time spent waiting on our own limits and backoffs apart.

Construct-before-fork / connect-after: the Session is created on first use in
the process that uses it; one found from another pid (inherited through a fork)
is abandoned, never used or closed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from collections import deque
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import requests
import urllib3

from workers.errors import HttpError, Stopping

log = logging.getLogger(__name__)

__all__ = ["Client", "HttpError", "Stopping", "PUBLISHED_LIMITS"]

WINDOW = 10.0  # seconds: Polymarket's limits are per 10 s sliding window
GLOBAL_LIMIT = 15000
# (api, endpoint family) -> requests per 10 s, as published (polymarket-api.md §6).
# Family "" is the API's general limit. Unlisted endpoints get only the general
# and global limits (the doc: assume the general limit).
PUBLISHED_LIMITS: Mapping[tuple[str, str], int] = {
    ("gamma", ""): 4000,
    ("gamma", "/markets"): 300,
    ("gamma", "/events"): 500,
    ("gamma", "/comments"): 200,
    ("gamma", "/tags"): 200,
    ("gamma", "/public-search"): 350,
    ("clob", ""): 9000,
    ("clob", "/book"): 1500,
    ("clob", "/price"): 1500,
    ("clob", "/midpoint"): 1500,
    ("clob", "/books"): 500,
    ("clob", "/prices"): 500,
    ("clob", "/midpoints"): 500,
    ("clob", "/prices-history"): 1000,
    ("clob", "/tick-size"): 200,
    ("data", ""): 1000,
    ("data", "/trades"): 200,
    ("data", "/positions"): 150,
    ("data", "/closed-positions"): 150,
}
_ID_SEGMENT = re.compile(r"^(\d+|0x[0-9a-fA-F]+|[0-9a-fA-F]{32,})$")
_VERSION_SEGMENT = re.compile(r"^v\d+$")
LATENCY_SAMPLES = 512
MAX_BODY = 64 << 20  # decoded bytes one answer may hold (a Gamma page of 500 markets is ~2 MB)
READ_CHUNK = 65536


class _BodyError(Exception):
    """An answer's body passed max_body bytes (too_large) or the call's deadline."""

    def __init__(self, message: str, too_large: bool):
        super().__init__(message)
        self.too_large = too_large


class Bucket:
    """A token bucket: `rate` requests/s on average, at most `burst` at once.

    take() reserves a slot and returns how long to wait before using it (the
    balance may go negative: later callers queue behind). hold(until) blocks
    the bucket until a time (a 429's Retry-After).
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]):
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self.tokens = self.burst
        self.last = clock()
        self.held_until = float("-inf")

    def take(self) -> float:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        wait = 0.0 if self.tokens >= 0 else -self.tokens / self.rate
        return max(wait, self.held_until - now)

    def hold(self, until: float) -> None:
        self.held_until = max(self.held_until, until)


class EndpointStats:
    """Counters and recent latencies of one endpoint."""

    def __init__(self):
        self.requests = 0  # HTTP exchanges attempted (retries included)
        self.calls = 0  # get_json/post_json calls
        self.errors = 0  # calls that ended in HttpError
        self.retries = 0
        self.throttled = 0  # 429s received
        self.wait_s = 0.0  # time spent waiting on our limits, Retry-After and backoff
        self.latency = deque(maxlen=LATENCY_SAMPLES)  # seconds per exchange
        self.max_s = 0.0

    def as_dict(self) -> dict:
        lat = sorted(self.latency)

        def pct(q):
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(math.ceil(q * len(lat))) - 1)] * 1000, 1)

        return {
            "calls": self.calls,
            "requests": self.requests,
            "errors": self.errors,
            "retries": self.retries,
            "throttled": self.throttled,
            "wait_ms": round(self.wait_s * 1000, 1),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": round(self.max_s * 1000, 1),
        }


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


class Client:
    """JSON over HTTP with timeouts, retries, backoff, rate limits and latency stats.

    timeout: (connect, read) seconds for every request.
    rate: fraction of the published per-10-s limits this process may use, as a
      token bucket of rate*limit/10 per second with a 2-second burst, so any 10 s
      window sees at most 1.2 * rate * limit; the default 0.4 leaves room for the
      other processes behind the same IP (limits are per IP). 0 disables it.
    retries: retries after the first attempt; deadline: seconds a call may take
      in total, waits included; backoff: (first, max) seconds, full jitter.
    apis: {base_url: "gamma"|"clob"|"data"} so URLs map to the right limits
      (polysim serves all of them on one host); unknown URLs are classified
      by host name.
    wait(seconds) -> bool sleeps and returns True when the worker is stopping
      (pass Worker.wait: it heartbeats and wakes on stop()); should_stop() is
      checked before each attempt.
    """

    def __init__(
        self,
        timeout: tuple[float, float] = (3.05, 10.0),
        rate: float = 0.4,
        retries: int = 4,
        *,
        deadline: float = 60.0,
        backoff: tuple[float, float] = (0.5, 20.0),
        max_retry_after: float = 60.0,
        apis: Mapping[str, str] | None = None,
        wait: Callable[[float], bool] | None = None,
        should_stop: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        user_agent: str = "collectord/0.1 (+https://github.com/collectord)",
        limits: Mapping[tuple[str, str], int] = PUBLISHED_LIMITS,
        max_body: int = MAX_BODY,
    ):
        if rate < 0 or retries < 0 or deadline <= 0:
            raise ValueError("rate and retries must be >= 0 and deadline > 0")
        self.timeout = (float(timeout[0]), float(timeout[1]))
        self.rate = float(rate)
        self.retries = int(retries)
        self.deadline = float(deadline)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.max_retry_after = float(max_retry_after)
        self.apis = sorted(((b.rstrip("/"), a) for b, a in (apis or {}).items() if b), key=lambda x: -len(x[0]))
        self._wait = wait or _sleep
        self._should_stop = should_stop or (lambda: False)
        self.clock = clock
        self.rng = rng or random.Random()
        self.user_agent = user_agent
        self.limits = dict(limits)
        self.max_body = int(max_body)
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._stats: dict[str, EndpointStats] = {}
        self._session: requests.Session | None = None
        self._pid = 0

    # -- session: one per process, created after the fork --------------------------
    def session(self) -> requests.Session:
        if self._session is None or self._pid != os.getpid():
            session = requests.Session()
            session.headers.update({"User-Agent": self.user_agent, "Accept": "application/json"})
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session, self._pid = session, os.getpid()
        return self._session

    def close(self) -> None:
        if self._session is not None and self._pid == os.getpid():
            self._session.close()
        self._session = None

    # -- public calls -------------------------------------------------------------
    def get_json(self, url: str, params: Mapping[str, Any] | list | None = None, *, endpoint: str | None = None) -> Any:
        """GET url?params -> decoded JSON. Raises HttpError or Stopping."""
        return self.request_json("GET", url, params=params, endpoint=endpoint)

    def post_json(self, url: str, body: Any, *, endpoint: str | None = None) -> Any:
        """POST url with a JSON body -> decoded JSON. Raises HttpError or Stopping."""
        return self.request_json("POST", url, body=body, endpoint=endpoint)

    def stats(self) -> dict:
        """Per-endpoint counters and latency percentiles, plus totals."""
        per = {name: s.as_dict() for name, s in sorted(self._stats.items())}
        return {
            "requests": sum(s.requests for s in self._stats.values()),
            "errors": sum(s.errors for s in self._stats.values()),
            "throttled": sum(s.throttled for s in self._stats.values()),
            "endpoints": per,
        }

    @property
    def requests_made(self) -> int:
        return sum(s.requests for s in self._stats.values())

    # -- classification ------------------------------------------------------------
    def classify(self, url: str) -> tuple[str, str, str]:
        """url -> (api, endpoint family for limits, endpoint name for stats)."""
        base_api = None
        for base, api in self.apis:
            if url == base or url.startswith(base + "/") or url.startswith(base + "?"):
                base_api = (base, api)
                break
        parts = urlsplit(url)
        if base_api:
            api = base_api[1]
            path = urlsplit(url[len(base_api[0]):] or "/").path or "/"
        else:
            host = parts.hostname or ""
            api = "gamma" if "gamma" in host else "clob" if "clob" in host else "data" if "data" in host else "other"
            path = parts.path or "/"
        segments = [s for s in path.split("/") if s]
        if segments and _VERSION_SEGMENT.match(segments[0]):
            segments = segments[1:]
        family = "/" + segments[0] if segments else "/"
        name = "/" + "/".join("{id}" if _ID_SEGMENT.match(s) else s for s in segments)
        return api, family, f"{api} {name}"

    def _bucket(self, key: tuple[str, str]) -> Bucket | None:
        if self.rate <= 0:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            limit = GLOBAL_LIMIT if key == ("*", "") else self.limits.get(key)
            if limit is None:
                return None
            rate = self.rate * limit / WINDOW
            bucket = self._buckets[key] = Bucket(rate, 2.0 * rate, self.clock)
        return bucket

    def _buckets_for(self, api: str, family: str) -> list[Bucket]:
        keys = [("*", ""), (api, ""), (api, family)]
        return [b for b in (self._bucket(k) for k in keys) if b is not None]

    # -- the loop ---------------------------------------------------------------
    def _pause(self, seconds: float, stats: EndpointStats) -> None:
        if seconds <= 0:
            return
        stats.wait_s += seconds
        if self._wait(seconds) or self._should_stop():
            raise Stopping("stopping")

    def _read_body(self, resp: requests.Response, until: float) -> bytes:
        """The whole decoded body, one socket read at a time, within max_body bytes and `until`."""
        parts, size = [], 0
        while True:
            chunk = resp.raw.read1(READ_CHUNK, decode_content=True)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > self.max_body:
                raise _BodyError(f"answer body over {self.max_body} bytes; refused", too_large=True)
            if self.clock() > until:
                raise _BodyError(f"answer body still arriving after the {self.deadline:g}s deadline ({size} bytes)",
                                 too_large=False)
            parts.append(chunk)

    def _retry_after(self, resp: requests.Response, content: bytes) -> float:
        """Seconds from Retry-After (seconds or HTTP date) or the body's retry_after_seconds."""
        value = resp.headers.get("Retry-After")
        seconds = None
        if value:
            try:
                seconds = float(value)
            except ValueError:
                try:
                    seconds = parsedate_to_datetime(value).timestamp() - time.time()
                except (TypeError, ValueError):
                    seconds = None
        if seconds is None:
            try:
                seconds = float(json.loads(content).get("retry_after_seconds"))
            except (ValueError, TypeError, AttributeError):
                seconds = None
        if seconds is None or not math.isfinite(seconds):
            return self._backoff(1)
        return min(max(0.0, seconds), self.max_retry_after)

    def _backoff(self, attempt: int) -> float:
        first, cap = self.backoff
        return self.rng.uniform(first / 2, min(cap, first * 2 ** (attempt - 1)))

    def request_json(self, method: str, url: str, *, params=None, body=None, endpoint: str | None = None) -> Any:
        """One call: attempts with retries as the module doc says. Raises HttpError or Stopping."""
        api, family, name = self.classify(url)
        name = endpoint or name
        stats = self._stats.setdefault(name, EndpointStats())
        stats.calls += 1
        buckets = self._buckets_for(api, family)
        started = self.clock()
        attempt = 0
        while True:
            if self._should_stop():
                raise Stopping("stopping")
            self._pause(max((b.take() for b in buckets), default=0.0), stats)
            status = None
            delay = None
            t0 = self.clock()
            stats.requests += 1
            try:
                resp = self.session().request(method, url, params=params, json=body, timeout=self.timeout,
                                              stream=True)
                try:
                    content = self._read_body(resp, started + self.deadline)  # a cut body fails here
                finally:
                    resp.close()
                status = resp.status_code
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                    requests.exceptions.InvalidSchema, requests.exceptions.InvalidHeader) as err:
                stats.errors += 1
                raise HttpError(f"{name}: bad request: {err}", url=url, endpoint=name) from None
            except _BodyError as err:
                if err.too_large:
                    stats.errors += 1
                    raise HttpError(f"{name}: {err}", url=url, endpoint=name, attempts=attempt + 1) from None
                problem = str(err)
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as err:
                problem = f"{type(err).__name__}"
            else:
                if 200 <= status < 300:
                    try:
                        data = json.loads(content)
                        elapsed = self.clock() - t0
                        stats.latency.append(elapsed)
                        stats.max_s = max(stats.max_s, elapsed)
                        return data
                    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                        problem = f"HTTP {status} with a body that is not JSON ({len(content)} bytes)"
                elif status == 429:
                    stats.throttled += 1
                    delay = self._retry_after(resp, content)
                    for b in buckets:
                        b.hold(self.clock() + delay)
                    problem = f"HTTP 429 (retry after {delay:.3g}s)"
                elif status >= 500 or status == 408 or (status == 403 and _is_html(resp, content)):
                    problem = f"HTTP {status}"
                else:
                    stats.errors += 1
                    raise HttpError(f"{name}: HTTP {status}: {_snippet(content)}", url=url, endpoint=name,
                                    status=status, attempts=attempt + 1)
            elapsed = self.clock() - t0
            stats.latency.append(elapsed)
            stats.max_s = max(stats.max_s, elapsed)
            attempt += 1
            if delay is None:
                delay = self._backoff(attempt)
            if attempt > self.retries or self.clock() + delay - started > self.deadline:
                stats.errors += 1
                raise HttpError(f"{name}: gave up after {attempt} attempt(s): {problem}", url=url, endpoint=name,
                                status=status, attempts=attempt)
            stats.retries += 1
            log.debug("%s: %s; retry %d in %.2fs", name, problem, attempt, delay)
            self._pause(delay, stats)


def _is_html(resp: requests.Response, content: bytes) -> bool:
    return "html" in resp.headers.get("Content-Type", "").lower() or content[:200].lstrip().lower().startswith(
        (b"<!doctype", b"<html"))


def _snippet(content: bytes) -> str:
    text = content[:200].decode("utf-8", "replace").replace("\n", " ")
    return text or "(empty body)"
