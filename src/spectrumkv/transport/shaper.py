"""Link emulation: a sender that cannot go faster than `gbps`, plus a one-way latency."""

from __future__ import annotations

import asyncio
import time


class LinkShaper:
    """Time on the wire = bytes * 8 / (gbps * 1e9), serialized like a real link; `latency_s` is
    added once before the first byte. gbps <= 0 means unshaped (loopback speed)."""

    def __init__(self, gbps: float = 0.0, latency_s: float = 0.0) -> None:
        self.rate = gbps * 1e9 / 8 if gbps > 0 else 0.0
        self.latency_s = latency_s
        self._free_at: float | None = None
        self.wire_s = 0.0

    async def transmit(self, nbytes: int) -> None:
        """Wait until `nbytes` would have left the link."""
        now = time.perf_counter()
        if self._free_at is None:
            self._free_at = now + self.latency_s
        start = max(now, self._free_at)
        duration = nbytes / self.rate if self.rate else 0.0
        self._free_at = start + duration
        self.wire_s += duration
        delay = self._free_at - now
        if delay > 0:
            await asyncio.sleep(delay)
