"""The Llama-family decode step (engines.llama_step) and its fused row ops (engines.rowops) against
the generic HF forward of the same runner, on SmolLM2-135M with real prompts."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import spectrumkv as skv
from spectrumkv.engines import llama_step, rowops
from spectrumkv.engines.hf import load
from spectrumkv.paged.cache import PagedKVCache
from spectrumkv.serve.runner import ModelRunner, pool_config

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Write a short poem about the sea at night. It should rhyme and mention the moon.",
)
N = 8


@pytest.fixture
def one_thread():
    """One torch thread: at a few rows per op a second OpenMP thread only waits (see README)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _decode(eng, prefilled, step) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of all prompts decoded together by a runner whose step is `step`
    ("hf": the generic forward; "ref" / "compiled": llama_step with those row ops), and every
    step's logits."""
    runner = ModelRunner(eng, PagedKVCache(pool_config(eng, 16)), "workqueue", fast=step != "hf")
    if step == "ref":
        runner.fast = llama_step.build(eng.model, compiled=False)
    assert (runner.fast is None) == (step == "hf")
    assert step != "compiled" or runner.fast.compiled  # the extension is built (setup.py)
    rids = list(range(len(prefilled)))
    for rid, (_, pre) in enumerate(prefilled):
        runner.write_prompt(rid, pre.layers, pre.n_tokens)
    tokens = [last for last, _ in prefilled]
    positions = [pre.n_tokens for _, pre in prefilled]
    out, logits = [[] for _ in rids], []
    for _ in range(N):
        lg = runner.step(rids, tokens, positions)
        logits.append(lg)
        tokens = lg.argmax(-1).tolist()
        positions = [p + 1 for p in positions]
        for o, t in zip(out, tokens, strict=True):
            o.append(t)
    return out, logits


@pytest.mark.model
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_step_equals_the_generic_hf_forward(dtype, one_thread):
    eng = load("smollm2-135m", dtype=dtype)
    ids = [eng.tokenizer(p, return_tensors="pt")["input_ids"][0] for p in PROMPTS]
    prefilled = []
    for t in ids:
        context, last = skv.split_prompt(t)
        prefilled.append((last, skv.prefill(eng, context)))
    hf_tokens, hf_logits = _decode(eng, prefilled, "hf")
    ref_tokens, ref_logits = _decode(eng, prefilled, "ref")
    # the torch row ops are HF's arithmetic op for op: bit-identical logits
    assert ref_tokens == hf_tokens
    assert all(torch.equal(a, b) for a, b in zip(ref_logits, hf_logits, strict=True))
    tokens, logits = _decode(eng, prefilled, "compiled")
    assert tokens == hf_tokens
    # the compiled RMSNorm sums in another order: float32 rounding only (bf16: a few units)
    tol = 2e-2 if dtype == "float32" else 1.0
    assert max(float((a - b).abs().max()) for a, b in zip(logits, hf_logits, strict=True)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_row_ops_match_the_torch_references(dtype):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    q, k, cos, sin = rand(5, 9 * 64), rand(5, 3 * 64), rand(5, 64), rand(5, 64)
    assert torch.equal(rowops.rope(q, k, cos, sin, 64), rowops.rope_ref(q, k, cos, sin, 64))
    for y in (None, rand(5, 576)):
        h, w = rand(5, 576, scale=30.0), rand(576)
        h1, h2 = h.clone(), h.clone()
        a, b = rowops.add_rmsnorm(h1, y, w, 1e-5), rowops.add_rmsnorm_ref(h2, y, w, 1e-5)
        assert torch.equal(h1, h2)  # the residual add: same rounding
        rel = ((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-3)).max()
        assert rel < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(rowops.RowOpsError):
        rowops.rope(q, k.half(), cos, sin, 64)
    with pytest.raises(rowops.RowOpsError):
        rowops.add_rmsnorm(rand(5, 576).t().contiguous().t(), None, rand(5), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_ops_over_threads_equal_one_thread(dtype, monkeypatch):
    """A prefill's rows are spread over torch's threads: every row's bits are those of one
    thread, and the first rows equal the same rows computed in a small (one-thread) call."""
    g = torch.Generator().manual_seed(1)
    rows = rowops.PARALLEL_MIN // 576 + 3
    h, y, w = (torch.randn(*s, generator=g).to(dtype) for s in ((rows, 576), (rows, 576), (576,)))
    q, k, cos, sin = (torch.randn(rows, n, generator=g).to(dtype) for n in (9 * 64, 3 * 64, 64, 64))
    runs = {}
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        h1 = h.clone()
        runs[threads] = (rowops.add_rmsnorm(h1, y, w, 1e-5), h1, rowops.rope(q, k, cos, sin, 64))
    for a, b in zip(runs[1], runs[3], strict=True):
        assert torch.equal(a, b)
    small = rowops.add_rmsnorm(h[:7].clone(), y[:7], w, 1e-5)
    assert torch.equal(small, runs[3][0][:7])
    assert torch.equal(rowops.rope(q[:7], k[:7], cos[:7], sin[:7], 64), runs[3][2][:7])


def test_build_covers_llama_only():
    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    assert llama_step.build(LlamaForCausalLM(LlamaConfig(**tiny))).compiled
    # float16 rows: the compiled ops do not take them, the torch ops do
    assert not llama_step.build(LlamaForCausalLM(LlamaConfig(**tiny)).half()).compiled
    dynamic = LlamaConfig(**tiny, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert llama_step.build(LlamaForCausalLM(dynamic)) is None
    assert llama_step.build(LlamaForCausalLM(LlamaConfig(**tiny, hidden_act="gelu"))) is None
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(**tiny, sliding_window=16))
    assert llama_step.build(gemma) is None  # the runner keeps the HF forward for Gemma-3
