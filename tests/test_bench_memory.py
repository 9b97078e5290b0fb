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

    extra, _ = memory.peak_extra_bytes(temporary)
    assert n <= extra < n + (2 << 20)
    extra, _ = memory.peak_extra_bytes(lambda: np.empty(n // 8))  # never written: not resident
    assert extra < 1 << 20


def test_reuses_of_freed_heap_still_count():
    """A temporary that lands in pages the allocator kept from an earlier one is still seen:
    freed heap goes back to the OS before each measurement."""
    for _ in range(3):
        extra, _ = memory.peak_extra_bytes(lambda: int(np.ones(1 << 18).sum()))  # 2 MB
        assert extra >= 2 << 20
