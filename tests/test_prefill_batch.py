"""Batched prefill (issue 18): several prompts in one packed forward give each the KV and window
queries it gets alone (up to float rounding), hooks fail alone, the prefill worker batches
queued requests, and greedy tokens through the workers equal the one-at-a-time path."""

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import msgspec
import pytest
import torch

import spectrumkv as skv
from spectrumkv.engines.hf import prefill, prefill_batch
from spectrumkv.engines.segments import ATTENTION as SEGMENTS
from spectrumkv.engines.segments import segment_attention, segments
from spectrumkv.errors import ConfigError
from spectrumkv.pd.batcher import MAX_BATCH_TOKENS, PrefillBatcher, batch_take, check_batch
from spectrumkv.pd.client import complete, token_ids
from spectrumkv.pd.launch import Cluster
from spectrumkv.pd.sampling import Cancelled

pytestmark = pytest.mark.model
PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea and the wind.",
    "List three prime numbers.",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here: on 2 shared, loaded cores two threads made these forwards ~10x
    slower (as cli.py's --threads help says)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _contexts(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 40000, (k,), generator=g) for k in (3, 45, 90)][:n]


def _collect(n: int) -> tuple[list[list], list]:
    got: list[list] = [[] for _ in range(n)]
    return got, [lambda i, kv, wq, j=j: got[j].append((i, kv, wq)) for j in range(n)]


def test_packed_prefill_gives_each_context_its_own_kv(smol):
    ctxs = _contexts()
    got, hooks = _collect(len(ctxs))
    assert prefill_batch(smol, ctxs, hooks) == [None] * len(ctxs)
    for ctx, mine in zip(ctxs, got, strict=True):
        alone = prefill(smol, ctx)
        assert [i for i, _, _ in mine] == list(range(smol.fingerprint.n_layers))
        for (_, kv, wq), ref, ref_wq in zip(mine, alone.layers, alone.window, strict=True):
            assert kv.keys.shape == ref.keys.shape and kv.keys.dtype == ref.keys.dtype
            assert torch.equal(kv.positions, ref.positions)
            # float32 compute, float16 KV: at most a couple of fp16 steps apart
            torch.testing.assert_close(kv.keys, ref.keys, atol=8e-3, rtol=2e-3)
            torch.testing.assert_close(kv.values, ref.values, atol=8e-3, rtol=2e-3)
            torch.testing.assert_close(wq.queries, ref_wq.queries, atol=1e-3, rtol=1e-4)
            assert wq.queries.shape == ref_wq.queries.shape


def test_segment_attention_equals_a_block_diagonal_mask_and_is_scoped():
    """One causal SDPA per span == SDPA over the packed sequence with a block-diagonal causal
    mask (GQA: 6 query heads on 2 KV heads); misuse raises; the model's attention is restored."""
    g = torch.Generator().manual_seed(1)
    spans = [(0, 5), (5, 37), (37, 40)]
    q = torch.randn(1, 6, 40, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 40, 16, generator=g)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 32, 3]))
    pos = torch.arange(40)
    visible = (pos[None] <= pos[:, None]) & (seg[None] == seg[:, None])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=visible, scale=0.3
    ).transpose(1, 2)
    model = torch.nn.Module()
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    with pytest.raises(RuntimeError, match="only inside segments"):
        segment_attention(None, q, k, v, None, 0.3)
    with segments(model, spans):
        assert model.config._attn_implementation == SEGMENTS
        out, _ = segment_attention(None, q, k, v, None, 0.3)
        with pytest.raises(RuntimeError, match="empty cache"):
            segment_attention(None, q, k[:, :, :30], v[:, :, :30], None, 0.3)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for bad in ([], [(1, 5)], [(0, 5), (6, 9)], [(0, 0)]):
        with pytest.raises(ValueError, match="tile"), segments(model, bad):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_a_failing_hook_stops_only_its_own_context(smol):
    ctxs = _contexts()
    got, hooks = _collect(len(ctxs))

    def bad(i, kv, wq):
        if i == 2:
            raise ValueError("boom")
        got[1].append((i, kv, wq))

    hooks[1] = bad
    errors = prefill_batch(smol, ctxs, hooks)
    assert errors[0] is None and errors[2] is None and isinstance(errors[1], ValueError)
    assert [len(g) for g in got] == [smol.fingerprint.n_layers, 2, smol.fingerprint.n_layers]


def test_sliding_window_models_and_bad_sizes_are_refused(smol):
    fp = msgspec.structs.replace(smol.fingerprint, sliding_layers=(0,), sliding_window=8)
    gemma_like = dataclasses.replace(smol, fingerprint=fp)
    with pytest.raises(ConfigError, match="full attention"):
        prefill_batch(gemma_like, _contexts(2), _collect(2)[1])
    assert PrefillBatcher(gemma_like, 8, threading.Lock()).size == 1
    with pytest.raises(ValueError, match="at least one token"):
        prefill_batch(
            smol, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], _collect(2)[1]
        )
    for bad in (0, -1, 65, 2.5, "4", True):
        with pytest.raises(ConfigError, match="prefill batch"):
            check_batch(bad)
    with (
        pytest.raises(ConfigError, match="prefill batch"),
        Cluster("smollm2-135m", prefill_batch=0),
    ):
        pass


def test_a_batch_takes_the_oldest_prompts_within_its_size_and_token_cap():
    cap = MAX_BATCH_TOKENS
    assert batch_take([], 4) == 0 and batch_take([cap + 1, 1], 4) == 1  # a long one goes alone
    assert batch_take([10] * 10, 4) == 4 and batch_take([10] * 3, 4) == 3
    assert batch_take([cap // 2, cap // 2, 1], 8) == 2 and batch_take([5, 5], 1) == 1


def test_the_batcher_runs_queued_requests_in_one_forward_and_isolates_failures(smol):
    lock = threading.Lock()
    batcher = PrefillBatcher(smol, 4, lock)
    ctxs = _contexts()
    got, hooks = _collect(len(ctxs))
    cancelled = threading.Event()
    cancelled.set()

    def bad(i, kv, wq):
        raise ValueError("bad policy")

    jobs = [(ctxs[0], hooks[0], threading.Event()), (ctxs[1], bad, threading.Event()),
            (ctxs[2], hooks[2], threading.Event()), (ctxs[0], hooks[1], cancelled)]  # fmt: skip
    with ThreadPoolExecutor(len(jobs)) as pool:
        with lock:  # the model is busy: all four queue
            futures = [pool.submit(batcher.prefill, *job) for job in jobs]
            while len(batcher._pending) < len(jobs):
                threading.Event().wait(0.01)
        starts = [futures[0].result(60), futures[2].result(60)]
        with pytest.raises(ValueError, match="bad policy"):
            futures[1].result(60)
        with pytest.raises(Cancelled, match="went away"):
            futures[3].result(60)
    assert starts[0] == starts[1]  # one forward
    assert len(got[0]) == len(got[2]) == smol.fingerprint.n_layers and got[1] == []


def test_greedy_tokens_through_batching_workers_equal_one_at_a_time(smol):
    want = []
    for p in PROMPTS:
        context, last = skv.split_prompt(skv.chat_ids(smol, p))
        want.append(
            skv.generate(smol, skv.reference_state(smol, skv.prefill(smol, context)), last, 8)
        )
    # the decode worker at a lower CPU priority (`decode_nice`): scheduling, not results
    cluster = Cluster("smollm2-135m", prefill_batch=4, decode_nice=3)
    with cluster as c, ThreadPoolExecutor(len(PROMPTS)) as pool:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, p.pid) - own for p in c.procs] == [0, 3]
        runs = [pool.submit(complete, c.url, p, 8, chat=True, budget=1.0) for p in PROMPTS]
        got = [r.result(300) for r in runs]
    assert all(r["spectrumkv"]["outcome"] == "ok" for r in got)
    assert [token_ids(r) for r in got] == want
