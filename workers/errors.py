"""One exception root for the collector side (workers never import collectord).

CollectorError is what a collector raises on purpose; `exit_code` says what the
process exits with if such an error escapes run() (1: the supervisor restarts it
with backoff). Worker.run() catches everything a step raises, so these mostly
travel from the HTTP client or a parser up to a step, which counts and logs them.
"""

from __future__ import annotations


class CollectorError(Exception):
    """Root of every error the workers package raises on purpose."""

    exit_code = 1


class HttpError(CollectorError):
    """The HTTP client gave up on a request (after its retries, or at once for a 4xx).

    status is the last HTTP status seen (None for connection errors, timeouts and
    malformed bodies); endpoint is the client's name for the URL ("clob /books").
    """

    def __init__(self, message: str, *, url: str = "", endpoint: str = "", status: int | None = None,
                 attempts: int = 0):
        self.url = url
        self.endpoint = endpoint
        self.status = status
        self.attempts = attempts
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        """False for answers a retry cannot change (4xx other than 408/429)."""
        return self.status is None or self.status >= 500 or self.status in (403, 408, 429)


class Stopping(CollectorError):
    """The worker is stopping: a wait or a retry loop gave up early on purpose."""

    exit_code = 0


class LeaseLost(CollectorError):
    """A polling collector lost its lease mid-cycle: another instance may poll now (workers/storage/lease.py)."""


class PayloadError(CollectorError):
    """A payload (or one item of it) does not have the shape its parser needs."""
