"""The decoder under mutation, and the fuzz harness's own detectors."""

import json
import random
import time

import pytest
import torch

from spectrumkv.bench import fuzz, mutations
from spectrumkv.bench.mutations import MUTATIONS, RESEALED
from spectrumkv.payload import decode_payload


def test_a_few_thousand_mutations_end_identical_or_in_a_typed_error():
    report = fuzz.run_fuzz(3000, seed=11)
    assert report.bad == 0, report.examples[:3]
    assert report.counts["typed_error"] > 2000
    assert all(sum(c.values()) > 0 for c in report.by_mutation.values())
    for name in set(MUTATIONS) - RESEALED:  # a raw mutation is never accepted as something else
        assert "accepted_resealed" not in report.by_mutation[name]
    # resealed families get past the checksums to the checks behind them
    reached = {m: " | ".join(report.errors_by_mutation[m]) for m in RESEALED}
    assert "ChecksumError" not in reached["resealed_tier_map"] + reached["resealed_frame_head"]
    for family, check in [
        ("resealed_header", "malformed header"),
        ("resealed_header", "bad quantization parameters"),
        ("resealed_header", "out of range"),
        ("resealed_tier_map", "invalid tier code"),
        ("resealed_tier_map", "padding nibble"),
        ("resealed_tier_map", "does not match its tier map"),
        ("resealed_tier_map", "different token set"),
        ("resealed_frame_head", "covers positions"),
        ("resealed_frame_head", "expected frame for layer"),
    ]:
        assert check in reached[family], (family, check, reached[family])
    assert report.by_mutation["resealed_sections"].get("accepted_resealed", 0) > 100


def test_sealing_an_unmutated_payload_gives_it_back(sample):
    raw, frames = mutations._unsealed(sample.payload, sample)
    assert mutations.seal(raw, frames) == sample.payload


@pytest.fixture(scope="module")
def sample():
    return fuzz.random_sample(random.Random(5))


def test_harness_flags_a_valid_but_different_payload_as_silent_corruption(sample):
    p = decode_payload(sample.payload)
    assert fuzz.classify(sample.payload, sample, 5.0, 256 << 20) == "identical"
    kv = p.layers[0]
    kv.keys.view(-1)[0] += 1  # the reference decode now differs from what the bytes say
    altered = fuzz.Sample(sample.payload, sample.header, sample.frame_starts, p)
    assert fuzz.classify(sample.payload, altered, 5.0, 256 << 20) == "silent_corruption"
    resealed = fuzz.classify(sample.payload, altered, 5.0, 256 << 20, resealed=True)
    assert resealed == "accepted_resealed"


@pytest.mark.parametrize(
    "decoder,outcome",
    [
        (lambda *a, **k: time.sleep(30), "hang"),
        (lambda *a, **k: [][1], "crash"),
        (lambda *a, **k: torch.ones(96 << 20, dtype=torch.uint8).sum(), "oversized_alloc"),
    ],
)
def test_harness_detects_hangs_crashes_and_big_allocations(monkeypatch, sample, decoder, outcome):
    monkeypatch.setattr(fuzz, "decode_payload", decoder)
    t0 = time.perf_counter()
    assert fuzz.classify(sample.payload, sample, 0.3, 64 << 20) == outcome
    assert time.perf_counter() - t0 < 5


def test_bench_fuzz_command_writes_the_issue_keys(tmp_path):
    from spectrumkv.cli import main

    out = tmp_path / "fuzz.json"
    assert main(["bench", "fuzz", "--cases", "300", "--samples", "8", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    for key in ("cases", "identical", "typed_error", "accepted_resealed", "crash", "hang",
                "oversized_alloc", "silent_corruption", "errors_by_mutation"):  # fmt: skip
        assert key in got
    assert got["cases"] == 300
    assert got["identical"] + got["typed_error"] + got["accepted_resealed"] == 300
