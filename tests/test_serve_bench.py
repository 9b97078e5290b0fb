"""`spectrumkv bench decode --quick`: the batch engine and the sequential path on the same
requests in process, and the batch engine behind real workers over HTTP; records as documented."""

import json

import pytest

from spectrumkv.cli import main
from spectrumkv.serve.http_bench import union_s

pytestmark = pytest.mark.model
KEYS = ("engine", "concurrency", "tokens_per_s", "ttft_p50_s", "tpot_p50_s", "completed", "failed",
        "peak_kv_bytes")  # fmt: skip


def test_bench_decode_quick(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--via", "process", "--quick", "--engines",
                 "batched,sequential", "--json", str(out)]) == 0  # fmt: skip
    records = json.loads(out.read_text())
    assert [r["engine"] for r in records] == ["batched", "sequential"]
    for r in records:
        for key in KEYS:
            assert key in r
        assert r["completed"] == 4 and r["failed"] == 0 and r["tokens_per_s"] > 0
    batched, sequential = records
    assert batched["tokens"] == sequential["tokens"]  # same greedy outputs' lengths
    assert batched["extra"]["mean_batch"] > 1 and batched["extra"]["limit_ms"] > 0
    assert batched["extra"]["limit_read_ms"] > 0
    assert batched["extra"]["token_ids"] == sequential["extra"]["token_ids"]
    out = capsys.readouterr().out
    assert "batched at 4 / sequential" in out and "4 of 4 requests' greedy tokens identical" in out


def test_bench_decode_http_quick(tmp_path, capsys):
    """Real prefill + decode workers (--engine batched, both computing in bfloat16), 4 streamed
    requests at once."""
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--quick", "--engines", "batched", "--dtype", "bfloat16",
                 "--json", str(out)]) == 0  # fmt: skip
    (r,) = json.loads(out.read_text())
    for key in KEYS:
        assert key in r
    x = r["extra"]
    assert x["mode"] == "http" and r["engine"] == "batched" and r["concurrency"] == 4
    assert r["completed"] == 4 and r["failed"] == 0 and x["errors"] == {}
    # 4 tokens each, streamed: decode tokens are the ones after each request's first
    assert x["completion_tokens"] == [4, 4, 4, 4] and r["tokens"] == 12
    assert all(len(ids) == 4 for ids in x["token_ids"])
    assert 0 < r["decode_s"] <= x["wall_s"] and r["tokens_per_s"] == r["tokens"] / r["decode_s"]
    assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] < x["wall_s"]
    # from the worker's /metrics: pages in use while decoding, and its engine's steps
    assert r["peak_kv_bytes"] > 0 and x["engine_steps"] >= 4 and x["mean_batch"] >= 1
    assert "batched at 4: bfloat16 compute, KV float16 pages" in capsys.readouterr().out


def test_union_of_decode_intervals():
    assert union_s([]) == 0
    assert union_s([(0, 2), (1, 3), (5, 6)]) == 4
    assert union_s([(0, 10), (2, 3)]) == 10


def test_vllm_server_that_dies_says_why(tmp_path, monkeypatch):
    """A vLLM server that exits during start-up raises VllmUnavailable with its log's tail."""
    import sys

    from spectrumkv.serve import vllm_engine

    fake = (sys.executable, "-c", "import sys; print('no AMX permission: SIGILL'); sys.exit(3)")
    monkeypatch.setattr(vllm_engine, "SERVE", fake)
    server = vllm_engine.VllmServer(vllm_engine.VllmSetup("smollm2-135m"), "smollm2-135m")
    with pytest.raises(vllm_engine.VllmUnavailable, match="code 3:\n.*SIGILL"):
        server.__enter__()
    assert server.proc is None and not server.log_dir.exists()  # stopped, temp log removed
