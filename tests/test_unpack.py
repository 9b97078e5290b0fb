"""Unpacker: received messages decoded on a worker thread, in order, failures surfaced."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from spectrumkv.transport.unpack import Unpacker


def test_messages_are_decoded_in_order_off_the_loop_and_in_flight_is_bounded():
    seen, threads, running = [], set(), []

    def decode(body):
        running.append(1)
        assert len(running) <= 1  # one worker: never two at once
        time.sleep(0.002)
        threads.add(threading.get_ident())
        seen.append(body)
        running.pop()

    async def main():
        u = Unpacker(ThreadPoolExecutor(max_workers=1), max_queued=3)
        for i in range(20):
            await u.feed(decode, i)
            assert len(u._pending) <= 3
        await u.drain()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert seen == list(range(20))
    assert threads and loop_thread not in threads


def test_first_failure_is_raised_by_the_next_feed_or_by_drain():
    def decode(body):
        if body == 2:
            raise ValueError("bad frame 2")

    async def feed_all():
        u = Unpacker(ThreadPoolExecutor(max_workers=1))
        try:
            for i in range(5):
                await u.feed(decode, i)
                await asyncio.sleep(0.02)  # let the worker get ahead
        finally:
            u.abandon()

    with pytest.raises(ValueError, match="bad frame 2"):
        asyncio.run(feed_all())

    async def drain_only():
        u = Unpacker(ThreadPoolExecutor(max_workers=1))
        await u.feed(decode, 2)
        await u.drain()

    with pytest.raises(ValueError, match="bad frame 2"):
        asyncio.run(drain_only())


def test_abandon_drops_queued_messages():
    done, gate = [], threading.Event()

    def decode(body):
        gate.wait(5)
        done.append(body)

    async def main():
        u = Unpacker(ThreadPoolExecutor(max_workers=1), max_queued=10)
        for i in range(5):
            await u.feed(decode, i)
        u.abandon()
        await asyncio.sleep(0.01)  # cancellation reaches the executor on the loop's next turn
        gate.set()
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert done == [0]  # the one already running finishes; the queued ones never start
