"""A circuit breaker for the decode worker's prefill peer.

After `threshold` consecutive transfers that failed because of the peer (unreachable, refused
authentication, closed or stalled past the deadline), the breaker opens: for `cooldown_s`
seconds requests do not try the peer at all and fail fast (recompute, or 502 with
on_failure=fail) instead of each waiting out the deadline. After the cool-down one request
tries the peer (half-open); its success closes the breaker, its failure opens it again.
Per-request failures (a budget no plan meets, a corrupt frame) do not count.
"""

from __future__ import annotations

import time


class CircuitBreaker:
    """threshold: consecutive peer failures that open it (0 = never opens). cooldown_s: seconds
    it stays open. Not thread-safe: use it from the event loop."""

    def __init__(self, threshold: int = 3, cooldown_s: float = 10.0) -> None:
        self.threshold, self.cooldown_s = threshold, cooldown_s
        self.failures = 0
        self.opened_at: float | None = None
        self.last_error = ""
        self._trial = False  # a half-open trial is in flight

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at < self.cooldown_s:
            return "open"
        return "half-open"

    def allow(self) -> bool:
        """May a request try the peer now? (In half-open state, only one at a time.)"""
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False

    def failure(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        self._trial = False
        if self.threshold and (self.failures >= self.threshold or self.opened_at is not None):
            self.opened_at = time.monotonic()

    def release(self) -> None:
        """A trial ended without telling anything about the peer (e.g. a bad request)."""
        self._trial = False
