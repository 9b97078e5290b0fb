"""Staged prompts on the batch engine (serve.staged): a prompt written into its pages layer by
layer from another thread (as SCD rebuilds B's cache frame by frame) decodes exactly like the
same KV submitted whole; every failure path gives its pages back."""

import threading
import time

import pytest
import torch

import spectrumkv as skv
from spectrumkv.pd.sampling import Cancelled, SamplingParams
from spectrumkv.serve.engine import BatchEngine, EngineConfig
from spectrumkv.serve.requests import PoolBusy
from spectrumkv.serve.runner import pool_config
from spectrumkv.serve.staged import StagedClosed
from spectrumkv.serve.worker import generate_batched

pytestmark = pytest.mark.model

PROMPT = "def fibonacci(n):"  # greedy runs past 40 tokens
N = 10


@pytest.fixture(scope="module")
def prompt(smol):
    ids = smol.tokenizer(PROMPT, return_tensors="pt")["input_ids"][0]
    context, last = skv.split_prompt(ids)
    return ids, last, skv.prefill(smol, context)


@pytest.fixture(scope="module")
def engine(smol):
    eng = BatchEngine(smol, EngineConfig(pool_mb=24, max_queue=4, queue_timeout_s=0.5))
    yield eng
    eng.close()


def _idle(eng: BatchEngine) -> bool:
    load = eng.load()
    return load["pages_free"] == load["pages_total"] and load["pages_reserved"] == 0


def _write_all(staged, layers) -> None:
    """Every layer, from a producer thread (as the unpack thread does), in order."""
    t = threading.Thread(target=lambda: [staged.write(i, kv) for i, kv in enumerate(layers)])
    t.start()
    t.join(60)


def test_staged_prompt_decodes_like_the_whole_prompt(smol, prompt, engine):
    ids, last, pre = prompt
    p = SamplingParams(max_tokens=N)
    whole = engine.submit(p, last, pre.n_tokens, layers=pre.layers).wait(120).token_ids
    staged = engine.stage(p, pre.n_tokens)
    assert staged.wait_admitted(30)
    assert engine.load()["pages_reserved"] > 0  # reserved before the first write
    _write_all(staged, pre.layers)
    back = staged.layers()  # read back from the pages: what was written, in the KV dtype
    for a, b in zip(back, pre.layers, strict=True):
        assert torch.equal(a.keys, b.keys.to(a.keys.dtype))
        assert torch.equal(a.values, b.values.to(a.values.dtype))
    got = engine.submit(p, last, pre.n_tokens, staged=staged).wait(120).token_ids
    assert got == whole and len(got) == N
    # n = 2 through the worker's helper: choice 0 from the staged pages, choice 1 from a copy
    staged = engine.stage(p, pre.n_tokens)
    assert staged.wait_admitted(30)
    _write_all(staged, pre.layers)
    two = SamplingParams(max_tokens=N, n=2)
    choices = generate_batched(engine, ids, staged, pre.n_tokens, two, lambda i, t: None,
                               threading.Event())  # fmt: skip
    assert [c.token_ids for c in choices] == [whole, whole]
    assert _idle(engine)


def test_every_failure_frees_the_staged_pages(smol, prompt, engine):
    ids, last, pre = prompt
    p = SamplingParams(max_tokens=N)
    # aborted half-way (a bad frame, a dead peer, the deadline): pages back, no later write
    staged = engine.stage(p, pre.n_tokens)
    assert staged.wait_admitted(30)
    for i in range(len(pre.layers) // 2):
        staged.write(i, pre.layers[i])
    with pytest.raises(ValueError, match="layers written"):  # incomplete: cannot decode
        engine.submit(p, last, pre.n_tokens, staged=staged)
    staged.abort()
    with pytest.raises(StagedClosed):
        staged.write(len(pre.layers) // 2, pre.layers[-1])
    deadline = time.monotonic() + 10
    while not _idle(engine) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _idle(engine)
    with pytest.raises(Cancelled):
        staged.wait_admitted(5)
    # a staged prompt never submitted by the worker's helper (an error before submit) is aborted
    staged = engine.stage(p, pre.n_tokens)
    assert staged.wait_admitted(30)
    with pytest.raises(ValueError):
        generate_batched(engine, ids, staged, pre.n_tokens, p, lambda i, t: None, threading.Event())
    deadline = time.monotonic() + 10
    while not _idle(engine) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _idle(engine)


def test_staging_waits_for_pages_then_pool_busy_and_close_frees_them(smol, prompt):
    _, last, pre = prompt
    pages = -(-(pre.n_tokens + N) // 16)
    cfg = EngineConfig(pool_mb=pool_config(smol, 1).page_bytes * 30 * pages / 2**20,
                       page_size=16, max_queue=2, queue_timeout_s=0.3)  # fmt: skip
    eng = BatchEngine(smol, cfg)  # room for one such prompt
    try:
        first = eng.stage(SamplingParams(max_tokens=N), pre.n_tokens)
        assert first.wait_admitted(30)
        second = eng.stage(SamplingParams(max_tokens=N), pre.n_tokens)
        assert not second.wait_admitted(0.05)  # no pages: it waits, nothing written
        with pytest.raises(PoolBusy):
            second.wait_admitted(10)
        _write_all(first, pre.layers[:3])
    finally:
        eng.close()  # the engine closed under a staged prompt: its pages are freed
    assert eng.cache.free_pages == eng.total_pages and eng.load()["pages_reserved"] == 0
    with pytest.raises(StagedClosed):
        first.write(3, pre.layers[3])
