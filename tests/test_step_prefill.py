"""engines.step_prefill: bf16 prefill through the hand-written Llama forward against the HF
forward (the same attention: the AMX kernel where the CPU has it, else SDPA), one prompt and
packed prompts, and its hook contract."""

import pytest
import torch

from spectrumkv.engines import flash, hf, step_prefill


@pytest.fixture(scope="module")
def bf16():
    return hf.load("smollm2-135m", dtype="bfloat16", kv_dtype="bfloat16")


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def test_step_prefill_matches_the_hf_forward(bf16, monkeypatch):
    """K, V and window queries within bf16 rounding of the HF forward's, same shapes and
    fields; packed prompts get what each gets alone."""
    assert step_prefill.step_for(bf16) is not None
    ids = torch.arange(2000, 2300)
    calls = []
    real = step_prefill.run
    monkeypatch.setattr(step_prefill, "run", lambda *a: calls.append(1) or real(*a))
    ours = hf.prefill(bf16, ids)
    packed: list[list] = [[], []]
    hooks = [lambda i, kv, wq, j=j: packed[j].append((kv, wq)) for j in range(2)]
    assert hf.prefill_batch(bf16, [ids[:120], ids[120:]], hooks) == [None, None]
    assert len(calls) == 2
    monkeypatch.setattr(step_prefill, "ENABLED", False)
    ref = hf.prefill(bf16, ids)
    assert len(calls) == 2  # the reference ran the HF forward
    for a, b in zip(ours.layers, ref.layers, strict=True):
        assert a.keys.shape == b.keys.shape and a.keys.dtype == b.keys.dtype
        assert a.keys.is_contiguous() and torch.equal(a.positions, b.positions)
        assert _rel(a.keys, b.keys) < 0.03 and _rel(a.values, b.values) < 0.04
    for a, b in zip(ours.window, ref.window, strict=True):
        assert a.queries.shape == b.queries.shape == (9, 32, 64)
        assert (a.scaling, a.sliding_window) == (b.scaling, b.sliding_window)
        assert _rel(a.queries, b.queries) < 0.03
    alone = hf.prefill(bf16, ids[120:])
    monkeypatch.setattr(step_prefill, "ENABLED", True)
    assert [len(p) for p in packed] == [bf16.fingerprint.n_layers] * 2
    for (kv, _), b in zip(packed[1], alone.layers, strict=True):
        assert kv.keys.shape == (3, 180, 64) and _rel(kv.keys, b.keys) < 0.03


def test_step_prefill_isolates_a_failing_hook(bf16):
    """A hook that raises stops its own prompt only; once every hook has raised the forward
    stops; `hf.prefill` re-raises its hook's exception."""
    step = step_prefill.step_for(bf16)
    ids = [torch.arange(500, 560), torch.arange(700, 740)]
    seen: list[list[int]] = [[], []]

    def failing(i, kv, wq):
        seen[0].append(i)
        if i == 2:
            raise RuntimeError("stop")

    errors = step_prefill.run(bf16, step, ids, [failing, lambda i, kv, wq: seen[1].append(i)])
    assert isinstance(errors[0], RuntimeError) and errors[1] is None
    assert seen == [[0, 1, 2], list(range(bf16.fingerprint.n_layers))]
    seen = [[], []]
    errors = step_prefill.run(bf16, step, ids, [failing, failing])
    assert all(isinstance(e, RuntimeError) for e in errors) and len(seen[0]) == 6
    with pytest.raises(RuntimeError, match="stop"):
        hf.prefill(bf16, ids[0], on_layer=lambda i, kv, wq: failing(i, kv, wq))


def test_hooked_layers_keep_the_hf_forward(bf16):
    """A caller's forward hook on a layer's module (SCD's capture, DroidSpeak) must fire: the
    step would bypass it, so the prefill keeps the HF forward while it is registered."""
    seen = []
    attn = bf16.model.model.layers[3].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.append(1), with_kwargs=True)
    try:
        assert step_prefill.step_for(bf16) is None
        hf.prefill(bf16, torch.arange(100, 140))
    finally:
        handle.remove()
    assert seen == [1] and step_prefill.step_for(bf16) is not None


def test_step_prefill_runs_without_the_amx_kernel(bf16, monkeypatch):
    """A CPU without AMX (or the kernel turned off): the step still serves bf16, with SDPA."""
    monkeypatch.setattr(flash, "ENABLED", False)
    assert step_prefill.step_for(bf16) is not None
    kv = hf.prefill(bf16, torch.arange(300, 340)).layers[0]
    assert kv.keys.shape == (3, 40, 64) and torch.isfinite(kv.keys.float()).all()


def test_step_prefill_is_bf16_llama_only():
    """float32 models keep the HF forward (and never the AMX kernel)."""
    eng = hf.load("smollm2-135m")
    assert step_prefill.step_for(eng) is None
    assert not flash.serves(eng.model)
