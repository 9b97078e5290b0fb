"""Verify and decode received payload messages off the event loop, in arrival order.

A receiver that decoded each frame on its event loop would stop reading its socket (and serving
its other connections) for as long as the codec runs: for a 7B model's 32K-token payload, most
of a second. `Unpacker` hands each message to one worker thread instead (the codec releases the
GIL), so the socket keeps filling while earlier frames are decoded. Used by the push receiver
and the PD decode worker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

#: Messages received but not yet decoded before `feed` stops reading the socket to wait for the
#: decoder (bounds the bytes held in flight to a few frames).
MAX_QUEUED = 8


class Unpacker:
    """Runs `fn(body)` for each fed message on `executor` (give it one worker thread: order
    matters, frames are decoded layer after layer). The first failure is raised by the next
    `feed` or by `drain`; `abandon` drops what is still queued after a failure or a deadline."""

    def __init__(self, executor: Executor, max_queued: int = MAX_QUEUED) -> None:
        self.executor = executor
        self.max_queued = max_queued
        self._pending: deque[asyncio.Future] = deque()

    async def feed(self, fn: Callable[[memoryview | bytearray], object], body) -> None:
        """Queue one message; waits while `max_queued` are still being decoded."""
        self._raise_failure()
        while len(self._pending) >= self.max_queued:
            await self._pending.popleft()
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self.executor, fn, body))

    async def drain(self) -> None:
        """Wait until every fed message is decoded; raises the first failure."""
        while self._pending:
            await self._pending.popleft()

    def abandon(self) -> None:
        """Cancel what has not started (the executor sees it on the loop's next turn); collect the
        errors of what finished. Nothing waits."""
        for fut in self._pending:
            if not fut.cancel() and fut.done():
                fut.exception()
        self._pending.clear()

    def _raise_failure(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
