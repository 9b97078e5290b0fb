"""Fault injection with real worker processes: closed sockets, stalls, corrupted bytes in flight,
a killed and restarted prefill worker. Every request ends correct or clearly failed, in time."""

import pytest

from spectrumkv.bench import faults

pytestmark = pytest.mark.model


def test_every_fault_ends_in_the_right_answer_or_a_clear_error():
    records, summary = faults.run_faults("smollm2-135m", rounds=10, seed=7, deadline_s=6.0)
    assert faults.is_clean(summary), summary
    assert set(summary["faults"]) == set(faults.FAULTS)
    assert summary["in_flight_after"] == 0
    assert max(r.seconds for r in records) < 6.0 + 30
    # a fault on the KV stream must not pass unnoticed as a different answer
    assert all(r.outcome != "wrong_answer" for r in records)
    assert summary["decode_rss_mb_end"] - summary["decode_rss_mb_start"] < 200
