"""The peak-memory meter behind `bench codec`'s temporaries columns."""

import numpy as np
import pytest

from spectrumkv.bench import memory

pytestmark = pytest.mark.skipif(
    not memory.available(), reason="needs Linux's /proc/self/clear_refs and glibc's malloc_trim"
)


def test_counts_what_a_call_touches_and_returns():
    n = 16 << 20
    extra, kept = memory.peak_extra_bytes(lambda: np.ones(n // 8))
    assert kept.nbytes == n and n <= extra < n + (2 << 20)


def test_counts_freed_temporaries_and_not_untouched_memory():
    n = 16 << 20

    def temporary() -> int:
        return int(np.ones(n // 8).sum())  # 16 MB touched, freed before returning

    # the resident set is the whole process's: another thread (one an earlier test left
    # running) can only add to it, so the least of three readings is fn's own
    def least(fn) -> int:
        return min(memory.peak_extra_bytes(fn)[0] for _ in range(3))

    extra = least(temporary)  # less at most a page or so that was resident already (seen: 4 KiB)
    assert n - (64 << 10) <= extra < n + (2 << 20)
    extra = least(lambda: np.empty(n // 8))  # never written: not resident
    assert extra < 1 << 20


def test_reuses_of_freed_heap_still_count():
    """A temporary that lands in pages the allocator kept from an earlier one is still seen:
    freed heap goes back to the OS before each measurement."""
    for _ in range(3):
        extra, _ = memory.peak_extra_bytes(lambda: int(np.ones(1 << 18).sum()))  # 2 MB
        assert extra >= 2 << 20


@pytest.mark.parametrize("fresh", [False, True])
def test_the_compiled_codec_holds_almost_no_temporaries_and_the_reference_many(fresh):
    """Issue 6's memory target, on a 4 MB layer (4 KV heads x 4096 tokens x 64 dims, bf16):
    the compiled codec encodes and decodes in place (a few KB of scratch per thread, a u64 per
    64 KiB of frame), the torch reference holds float32 copies of whole sections."""
    import torch

    from spectrumkv.bench.codec import (
        Buffers,
        CacheShape,
        synthetic_cache,
        synthetic_header,
        temporaries,
    )
    from spectrumkv.tiers import Tier

    shape = CacheShape(layers=1, kv_heads=4, tokens=4096, q_heads=4)
    layers = synthetic_cache(shape, torch.bfloat16)
    header = synthetic_header(shape, "bfloat16", "random-tier", None)
    tiers = torch.randint(0, len(Tier), (1, 4096), generator=torch.Generator().manual_seed(0))
    tiers = tiers.to(torch.uint8)
    bufs = None if fresh else Buffers.for_layers(layers)
    layer_bytes = 2 * layers[0].keys.nbytes
    temporaries(layers, header, tiers, True, bufs)  # helper threads started outside the count
    encode, decode = temporaries(layers, header, tiers, True, bufs)
    assert encode < 0.05 * layer_bytes and decode < 0.05 * layer_bytes
    encode, decode = temporaries(layers, header, tiers, False, bufs)
    assert encode > layer_bytes and decode > layer_bytes
