"""A short load run through the HTTP front of real workers (the decode worker's default
continuous-batching engine): nothing fails, nothing is left, no KV page stays held."""

import pytest

from spectrumkv.bench.load import run_load

pytestmark = pytest.mark.model


def test_concurrent_clients_all_complete_and_leave_no_state():
    report = run_load("smollm2-135m", clients=6, duration_s=12.0)
    assert report.failed == 0 and report.rejected == 0, report.errors
    assert report.completed >= 6
    assert report.in_flight_after == 0
    assert report.engine_steps > 0 and report.mean_batch >= 1 and report.decode_tokens_per_s > 0
    assert report.pages_total > 0 and report.pages_used_after == report.pages_reserved_after == 0
    assert 0 < report.ttft_p50_s <= report.ttft_p99_s
    assert len(report.memory) >= 3
