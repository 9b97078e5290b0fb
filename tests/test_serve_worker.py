"""The decode worker on the batch engine (`--engine batched`), in process: concurrent requests
decode together and answer what the one-at-a-time path answers; a full pool is HTTP 503 with
Retry-After; a request larger than the pool is a 400; no pages leak. The prefill peer is
unreachable here, so every request takes the recompute path (a local prefill into pages)."""

import asyncio
import json

import pytest

import spectrumkv as skv
from spectrumkv.integrations.vllm.launch import free_port
from spectrumkv.pd import openai
from spectrumkv.pd.decode_worker import DecodeConfig, DecodeWorker
from spectrumkv.pd.openai import ApiError, ServerDefaults

pytestmark = pytest.mark.model


def _worker(smol, pool_mb, timeout_s=30.0) -> DecodeWorker:
    cfg = DecodeConfig("127.0.0.1", free_port(), b"s" * 32, engine="batched",
                       kv_pool_mb=pool_mb, kv_queue_timeout_s=timeout_s)  # fmt: skip
    return DecodeWorker(smol, cfg)


def _job(smol, prompt, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
    return openai.parse(smol, ServerDefaults(), body, chat=False)


async def _run(worker, job, i):
    async def ignore(index, text):
        return None

    return await worker.run(job, f"cmpl-{i}", ignore)


def test_concurrent_requests_batch_and_match_sequential(smol):
    worker = _worker(smol, 32)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was"]
    jobs = [_job(smol, p, 8) for p in prompts]

    async def main():
        return await asyncio.gather(*(_run(worker, j, i) for i, j in enumerate(jobs)))

    try:
        answers = asyncio.run(main())
        for job, ans in zip(jobs, answers, strict=True):
            context, last = skv.split_prompt(job.ids)
            ref = skv.generate(smol, skv.reference_state(smol, skv.prefill(smol, context)), last, 8)
            assert ans["choices"][0]["token_ids"] == ref
            assert ans["spectrumkv"]["outcome"] == "recomputed"
        assert worker.batch.stats.batch_sum > worker.batch.stats.steps  # some steps batched
        metrics = worker.metrics.registry.get_sample_value
        assert metrics("spectrumkv_engine_tokens_total") == worker.batch.stats.tokens
        assert worker.batch.cache.free_pages == worker.batch.total_pages
    finally:
        worker.close()


def test_full_pool_is_503_with_retry_after_and_too_large_is_400(smol):
    page_mb = 30 * 2 * 3 * 16 * 64 * 2 / 2**20  # one page of SmolLM2-135M, all layers
    worker = _worker(smol, 5 * page_mb, timeout_s=0.3)  # 5 pages: one request at a time
    long, short = _job(smol, "def fibonacci(n):", 60), _job(smol, "def fibonacci(n):", 40)

    async def main():
        return await asyncio.gather(_run(worker, long, 0), _run(worker, short, 1),
                                    return_exceptions=True)  # fmt: skip

    try:
        answers = asyncio.run(main())
        # both reach the engine after their transfer fails; either may be admitted first
        refused = [a for a in answers if isinstance(a, ApiError)]
        served = [
            (j, a) for j, a in zip((long, short), answers, strict=True) if isinstance(a, dict)
        ]
        assert len(refused) == 1 and len(served) == 1, answers
        job, answer = served[0]
        assert len(answer["choices"][0]["token_ids"]) == job.sampling.max_tokens
        busy = refused[0]
        assert busy.status == 503
        assert int(busy.headers["Retry-After"]) >= 1 and busy.code == "kv_pool_full"
        with pytest.raises(ApiError) as e:
            asyncio.run(_run(worker, _job(smol, "def fibonacci(n):", 200), 2))
        assert e.value.status == 400 and e.value.code == "kv_pool_too_small"
        assert worker.batch.cache.free_pages == worker.batch.total_pages
    finally:
        worker.close()
