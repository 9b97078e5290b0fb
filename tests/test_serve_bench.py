"""`spectrumkv bench decode --quick`: the batch engine and the sequential path on the same
requests, records as documented."""

import json

import pytest

from spectrumkv.cli import main

pytestmark = pytest.mark.model


def test_bench_decode_quick(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--quick", "--engines", "batched,sequential",
                 "--json", str(out)]) == 0  # fmt: skip
    records = json.loads(out.read_text())
    assert [r["engine"] for r in records] == ["batched", "sequential"]
    for r in records:
        for key in ("engine", "concurrency", "tokens_per_s", "ttft_p50_s", "tpot_p50_s",
                    "completed", "failed", "peak_kv_bytes"):  # fmt: skip
            assert key in r
        assert r["completed"] == 4 and r["failed"] == 0 and r["tokens_per_s"] > 0
    batched, sequential = records
    assert batched["tokens"] == sequential["tokens"]  # same greedy outputs' lengths
    assert batched["extra"]["mean_batch"] > 1 and batched["extra"]["limit_ms"] > 0
    assert batched["extra"]["token_ids"] == sequential["extra"]["token_ids"]
    out = capsys.readouterr().out
    assert "batched at 4 / sequential" in out and "4 of 4 requests' greedy tokens identical" in out
