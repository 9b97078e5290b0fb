"""A short load run through the HTTP front of real workers: nothing fails, nothing is left."""

import pytest

from spectrumkv.bench.load import run_load

pytestmark = pytest.mark.model


def test_concurrent_clients_all_complete_and_leave_no_state():
    report = run_load("smollm2-135m", clients=6, duration_s=12.0)
    assert report.failed == 0, report.errors
    assert report.completed >= 6
    assert report.in_flight_after == 0
    assert 0 < report.ttft_p50_s <= report.ttft_p99_s
    assert len(report.memory) >= 3
