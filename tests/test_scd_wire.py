"""SCD on the wire and in the workers (issue 20): SCD payload round trip (FP16 and quantized
codes), every single-byte corruption detected, other versions / kinds / artifacts refused;
two real worker processes (A = a tiny base model, B = its fine-tune made inside the test, an
artifact calibrated inside the test): SCD answers closer to the oracle than raw reuse, a wrong
artifact refused and recomputed, a corrupted frame detected; the fuzzer's quick mode covers
SCD payloads."""

import asyncio
import dataclasses
import functools
import json
import random

import msgspec
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from spectrumkv.assets import load_text, model_dir
from spectrumkv.bench import fuzz
from spectrumkv.bench.faults import Fault, FaultProxy
from spectrumkv.bench.fuzz_scd import random_scd_sample
from spectrumkv.bench.mutations import MUTATIONS
from spectrumkv.engines.hf import load
from spectrumkv.errors import IncompatiblePayloadError, SpectrumKVError, WireFormatError
from spectrumkv.payload import decode_payload
from spectrumkv.pd import openai
from spectrumkv.pd.client import complete, get_text, token_ids
from spectrumkv.pd.decode_worker import DecodeConfig, DecodeWorker
from spectrumkv.pd.launch import Cluster
from spectrumkv.pd.openai import ApiError, ServerDefaults
from spectrumkv.pd.sampling import SamplingParams
from spectrumkv.scd import artifact
from spectrumkv.scd import wire as scd_wire
from spectrumkv.scd.calibrate import CalibConfig, calibrate
from spectrumkv.scd.codes import encode, quantize_codes, reconstruct_layer
from spectrumkv.scd.finetune import Recipe, finetune
from spectrumkv.scd.fit import Aligner
from spectrumkv.serve.staged import StagedPrompt
from spectrumkv.tiers import Tier
from spectrumkv.wire import _PREAMBLE, MAX_HEADER_BYTES

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)  # fmt: skip
SMALL = dict(prompts=2, prompt_tokens=96, patch_rank=16, max_patches=1, aligner_steps=5,
             aligner_width=16, dev_chunks=1, dev_context=112, dev_continuation=16,
             code_budget=0.75)  # fmt: skip


def _sample(seed: int, quantized: bool):
    return random_scd_sample(random.Random(seed), quantized=quantized)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("seed", [1, 27])  # 27: sliding layers 0 and 2 keep 5 of 22 tokens
def test_scd_round_trip(quantized, seed):  # 1, quantized: 13 of 21 tokens dropped
    s = _sample(seed, quantized)
    header, got = scd_wire.decode(s.payload, s.layout)
    assert header == s.header and len(got) == len(s.codes)
    dropped = s.tiers == int(Tier.DROP)
    assert int(dropped.sum()) == (13 if (seed, quantized) == (1, True) else 0)
    for g, w, i in zip(got, s.codes, range(len(got)), strict=True):
        assert torch.equal(g.positions, w.positions[~dropped[w.positions]])
        assert w.positions.numel() == s.header.n_tokens - s.layout.first(i, s.header.n_tokens)
    if seed == 27:
        assert [g.positions.numel() for g in got][::2] == [5, 5]
    want = quantize_codes(s.codes, s.tiers) if quantized else s.codes
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.positions, w.positions)
        for name in ("k", "v", "h"):
            x, y = getattr(g, name), getattr(w, name)
            assert (x is None) == (y is None)
            if x is not None:  # FP16 codes exact; quantized = the project's quantizer, exact
                assert torch.equal(x, y.half().float() if not quantized else y)
    assert any(g.h is not None for g in got) and any(g.k is not None for g in got)
    # a receiver caps every message (header or any layer's frame) at this, before reading it
    cap = s.layout.max_message_bytes(s.header.n_tokens)
    bounds = [0, *s.frame_starts, len(s.payload)]
    assert all(e - b <= cap for b, e in zip(bounds[:-1], bounds[1:], strict=True))


def test_every_single_byte_corruption_is_detected():
    s = _sample(2, quantized=True)
    for i in range(len(s.payload)):
        bad = bytearray(s.payload)
        bad[i] ^= 1 << (i % 8)
        with pytest.raises(SpectrumKVError):
            scd_wire.decode(bytes(bad), s.layout)


def test_versions_kinds_and_artifacts_are_refused_clearly():
    s = _sample(3, quantized=False)
    old = bytearray(s.payload)
    old[4] = 3  # a version 3 preamble
    with pytest.raises(IncompatiblePayloadError, match="version 3 not supported"):
        scd_wire.decode(bytes(old), s.layout)
    with pytest.raises(IncompatiblePayloadError, match="SCD payload where a KV payload"):
        decode_payload(s.payload)
    other = dataclasses.replace(s.layout, artifact="e" * 64)
    with pytest.raises(IncompatiblePayloadError, match="artifact"):
        scd_wire.decode(s.payload, other)
    forged = _PREAMBLE.pack(b"SPKV", 4, 1, MAX_HEADER_BYTES + 1) + b"\0" * 16
    with pytest.raises(WireFormatError, match="exceeds"):
        scd_wire.read_header(forged, s.layout)
    # a frame declaring more bytes than any valid frame: refused before reading the body
    _, start = scd_wire.read_header(s.payload, s.layout)
    big = bytearray(s.payload)
    big[start + 12 : start + 16] = (1 << 31).to_bytes(4, "little")
    with pytest.raises(WireFormatError, match="more than"):
        scd_wire.decode(bytes(big), s.layout)


# ---- two real worker processes: A's prefill worker, B's decode worker --------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base model A, its fine-tune B (a few steps at a high learning rate), the SCD
    artifact calibrated for A -> B, and a second valid A -> B artifact the prefill worker
    does not hold."""
    d = tmp_path_factory.mktemp("scdpair")
    corpus = d / "text.txt"
    corpus.write_text(load_text("wiki")[:120_000], encoding="utf-8")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY)).save_pretrained(d / "a")
    tok.save_pretrained(d / "a")
    recipe = Recipe(base=str(d / "a"), corpus=str(corpus), steps=4, lr=3e-3, batch=2,
                    seq_len=64, warmup=1)  # fmt: skip
    b = finetune(recipe, d / "b")
    art = calibrate(load(str(d / "a")), load(str(b)), CalibConfig(corpus=str(corpus), **SMALL))
    artifact.save(art, d / "held" / "ab")
    other = artifact.Artifact(msgspec.structs.replace(art.manifest, eps=0.5), art.tensors)
    artifact.save(other, d / "other")
    fresh = msgspec.structs.replace(art.manifest, head_tokens=2, tail_tokens=6)
    artifact.save(artifact.Artifact(fresh, art.tensors), d / "held" / "fresh")
    prompts = [load_text(str(corpus))[30_000 + 3_000 * j : 33_000 + 3_000 * j] for j in range(4)]
    return {"a": str(d / "a"), "b": str(b), "held": d / "held", "art": d / "held" / "ab",
            "fresh": d / "held" / "fresh", "other": d / "other", "prompts": prompts}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(pair):
    proxy: list[FaultProxy] = []

    def route(port: int) -> int:
        proxy.append(FaultProxy(port))
        return proxy[0].port

    c = Cluster(pair["b"], prefill_model=pair["a"], route=route,
                prefill_args=["--scd-artifacts", str(pair["held"])],
                decode_args=["--scd", str(pair["art"]), "--deadline", "30"])  # fmt: skip
    with c:
        c.proxy = proxy[0]
        yield c
    proxy[0].close()


@functools.cache
def _tokenizer():
    return AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))


def _ask(c, prompt: str, **opts) -> dict:
    """`prompt` cut to 48 tokens, 8 tokens generated."""
    tok = _tokenizer()
    return complete(c.url, tok.decode(tok(prompt)["input_ids"][:48]), 8, **opts)


def _leading(got: list[int], ref: list[int]) -> int:
    """How many leading tokens of `got` equal the oracle's `ref`."""
    n = 0
    while n < min(len(got), len(ref)) and got[n] == ref[n]:
        n += 1
    return n


def test_scd_is_served_and_closer_to_the_oracle_than_raw_reuse(cluster, pair):
    lead = {"raw": 0, "scd": 0, "scd-q": 0, "scd-drop": 0}
    for prompt in pair["prompts"][:2]:
        oracle = _ask(cluster, prompt, method="recompute")
        assert oracle["spectrumkv"]["method"] == "recompute"
        ref = token_ids(oracle)
        for name, opts in (("raw", {"method": "raw"}), ("scd", {}),
                           ("scd-q", {"code_budget": 0.45}),
                           ("scd-drop", {"code_budget": 0.15})):  # fmt: skip
            r = _ask(cluster, prompt, **opts)
            s = r["spectrumkv"]
            assert s["outcome"] == "ok" and s["method"] == name.split("-")[0], s
            got = token_ids(r)
            lead[name] += _leading(got, ref)
            if name == "scd":
                assert s["reconstruct_s"] > 0 and 0 < s["wire_ratio"] < 1, s
            if name == "scd-q":
                assert s["wire_ratio"] <= 0.45, s
            if name == "scd-drop":  # below all-INT4: codes of the least important tokens dropped
                assert s["wire_ratio"] <= 0.15 and len(got) == 8, s
    assert lead["scd"] > lead["raw"], lead
    metrics = get_text(cluster.url, "/metrics")
    assert 'spectrumkv_scd_bytes_total{method="scd"}' in metrics
    assert "spectrumkv_scd_reconstruct_seconds_count" in metrics


def test_kv_from_another_model_is_never_taken_silently(cluster, pair):
    r = _ask(cluster, pair["prompts"][0], method="kv")
    s = r["spectrumkv"]
    assert s["outcome"] == "recomputed" and "IncompatiblePayloadError" in s["reason"], s


def test_corrupted_scd_frame_is_detected_and_recomputed(cluster, pair):
    ok = _ask(cluster, pair["prompts"][1])
    ref, size = token_ids(ok), ok["spectrumkv"]["wire_bytes"]
    cluster.proxy.arm(Fault("corrupt", offset=size // 2 + 300))
    r = _ask(cluster, pair["prompts"][1])
    s = r["spectrumkv"]
    assert s["outcome"] == "recomputed" and "ChecksumError" in s["reason"], s
    assert token_ids(r) == token_ids(_ask(cluster, pair["prompts"][1], method="recompute"))
    assert len(ref) == len(token_ids(r))


def _in_process(cluster, pair, art: str, engine: str, text: str, **spectrumkv) -> dict:
    """One request (4 tokens) through an in-process decode worker of B with artifact `art` and
    `engine`, dialling the cluster's prefill worker directly."""
    worker = _worker(cluster, pair, art, engine, cluster.prefill_port)
    try:
        return _run(worker, text, **spectrumkv)
    finally:
        if worker.batch is not None:
            worker.batch.close()


def _worker(cluster, pair, art: str, engine: str, port: int, dtype="float32") -> DecodeWorker:
    cfg = DecodeConfig("127.0.0.1", port, cluster.secret.encode(),
                       engine=engine, kv_pool_mb=16, scd_artifact=art)  # fmt: skip
    return DecodeWorker(load(pair["b"], dtype=dtype), cfg)


def _run(worker: DecodeWorker, text: str, **spectrumkv) -> dict:
    body = json.dumps({"prompt": text, "max_tokens": 4, "spectrumkv": spectrumkv}).encode()
    job = openai.parse(worker.engine, worker.cfg.defaults, body, False)

    async def ignore(i, t):
        return None

    return asyncio.run(worker.run(job, "cmpl-in-process", ignore))


def test_wrong_artifact_is_refused_clearly_and_recomputed(cluster, pair):
    text = pair["prompts"][2][:200]
    s = _in_process(cluster, pair, str(pair["other"]), "sequential", text)["spectrumkv"]
    assert s["outcome"] == "recomputed" and s["method"] == "scd", s
    assert "ArtifactMismatchError" in s["reason"] and "no SCD artifact" in s["reason"], s
    # a B worker with an artifact calibrated for another consumer does not start
    with pytest.raises(artifact.ArtifactMismatchError):
        DecodeWorker(load(pair["a"]), DecodeConfig("127.0.0.1", 1, b"x",
                     scd_artifact=str(pair["art"])))  # fmt: skip


def test_both_engines_generate_the_same_tokens_from_scd_codes(cluster, pair):
    text = pair["prompts"][2][:200]
    for opts in ({}, {"code_budget": 0.15}):  # 0.15: below all-INT4, some codes dropped
        got = {}
        for engine in ("sequential", "batched"):
            r = _in_process(cluster, pair, str(pair["art"]), engine, text, **opts)
            assert r["spectrumkv"]["outcome"] == "ok" and r["spectrumkv"]["method"] == "scd"
            got[engine] = token_ids(r)
        assert got["sequential"] == got["batched"], opts


def test_refresh_artifact_codes_fewer_tokens_and_both_engines_agree(cluster, pair):
    """An artifact with a refresh (B recomputes the first 2 and last 6 prompt tokens): A codes
    all but the last 6 (fewer wire bytes than the same artifact without it, against the raw
    FP16 KV of the whole prompt), and both engines generate the same tokens from the refreshed
    cache."""
    text = pair["prompts"][2][:200]
    plain = _in_process(cluster, pair, str(pair["art"]), "sequential", text)["spectrumkv"]
    got = {}
    for engine in ("sequential", "batched"):
        r = _in_process(cluster, pair, str(pair["fresh"]), engine, text)
        s = r["spectrumkv"]
        assert s["outcome"] == "ok" and s["method"] == "scd", s
        assert s["wire_bytes"] < plain["wire_bytes"] and s["reconstruct_s"] > 0, (s, plain)
        assert s["fp16_bytes"] == plain["fp16_bytes"] and s["wire_ratio"] < plain["wire_ratio"]
        got[engine] = token_ids(r)
    assert got["sequential"] == got["batched"] and len(got["batched"]) == 4


def test_batched_scd_rebuilds_into_pages_and_a_bad_frame_frees_them(cluster, pair, monkeypatch):
    """On the batch engine each rebuilt layer is written straight into the request's pages
    (StagedPrompt.write, once per layer); a corrupted frame half-way aborts them: recomputed,
    and no page stays taken or reserved."""
    writes: list[int] = []
    write = StagedPrompt.write
    monkeypatch.setattr(StagedPrompt, "write", lambda s, i, kv: (writes.append(i), write(s, i, kv)))
    worker = _worker(cluster, pair, str(pair["art"]), "batched", cluster.proxy.port)
    try:
        ok = _run(worker, pair["prompts"][3][:300])["spectrumkv"]
        assert ok["outcome"] == "ok" and ok["method"] == "scd", ok
        layers = worker.engine.fingerprint.n_layers
        assert writes == list(range(layers))
        load_ = worker.batch.load()
        assert load_["pages_free"] == load_["pages_total"] and load_["pages_reserved"] == 0
        writes.clear()
        cluster.proxy.arm(Fault("corrupt", offset=ok["wire_bytes"] * 2 // 3))
        bad = _run(worker, pair["prompts"][3][:300])["spectrumkv"]
        assert bad["outcome"] == "recomputed" and "ChecksumError" in bad["reason"], bad
        assert 0 < len(writes) < layers  # it failed mid-way, with pages written
        load_ = worker.batch.load()
        assert load_["pages_free"] == load_["pages_total"] and load_["pages_reserved"] == 0
    finally:
        worker.batch.close()


def test_batched_scd_without_pages_is_503_or_400_not_a_recompute(cluster, pair):
    """No pages for B's rebuilt cache: a pool held by another prompt is HTTP 503 with
    Retry-After once the queue timeout passes, a prompt larger than the whole pool is 400 — not
    a transfer failure (which would be a 502 with on_failure "fail", or a recompute that waits
    for pages again); no page stays taken or reserved."""
    b = load(pair["b"])
    text = pair["prompts"][3][:300]
    body = json.dumps({"prompt": text}).encode()
    n_prompt = len(openai.parse(b, ServerDefaults(), body, False).ids)
    page_mb = 16 * b.fingerprint.kv_token_bytes(2) / 2**20
    need = -(-(n_prompt + 4) // 16)  # the request's pages (4 new tokens)

    def worker(pages: int) -> DecodeWorker:
        cfg = DecodeConfig("127.0.0.1", cluster.prefill_port, cluster.secret.encode(),
                           engine="batched", kv_pool_mb=pages * page_mb * 1.001,
                           kv_queue_timeout_s=0.3, scd_artifact=str(pair["art"]))  # fmt: skip
        return DecodeWorker(b, cfg)

    small = worker(need - 1)
    try:
        with pytest.raises(ApiError) as e:
            _run(small, text, on_failure="fail")
        assert e.value.status == 400 and e.value.code == "kv_pool_too_small"
    finally:
        small.close()
    busy = worker(need)
    try:
        held = busy.batch.stage(SamplingParams(max_tokens=1), 16 * need - 1)  # the whole pool
        assert held.wait_admitted(10)
        with pytest.raises(ApiError) as e:
            _run(busy, text, on_failure="fail")
        assert e.value.status == 503 and e.value.code == "kv_pool_full"
        assert int(e.value.headers["Retry-After"]) >= 1
        held.abort()
        assert _run(busy, text)["spectrumkv"]["outcome"] == "ok"  # pages free again: served
        load_ = busy.batch.load()
        assert load_["pages_free"] == load_["pages_total"] and load_["pages_reserved"] == 0
    finally:
        busy.close()


def test_bfloat16_decode_worker_rebuilds_from_scd_codes(cluster, pair):
    """B computing in bf16 (serve decode --dtype bfloat16) generates from SCD codes, and
    rebuilds a patch layer (the aligner's float32 output meets B's bf16 K/V projections) close
    to its float32 rebuild."""
    art = artifact.load(str(pair["art"]))
    m, hidden = art.manifest, TINY["hidden_size"]
    torch.manual_seed(1)  # layer 1 made a patch layer, with a PCA basis and an aligner
    al = Aligner(m.patch_rank, hidden, m.aligner_width)
    patch = {"1.h.mu": torch.zeros(hidden),
             "1.h.basis": torch.linalg.qr(torch.randn(hidden, m.patch_rank))[0]}  # fmt: skip
    patch |= {f"1.al.{k}": v for k, v in al.state_dict().items()}
    patched = artifact.Artifact(msgspec.structs.replace(m, patch_layers=[1]),
                                art.tensors | patch)  # fmt: skip
    ids = torch.arange(40, 104)
    codes = encode(patched, load(pair["a"]), ids)
    assert codes[1].h is not None
    f32, b16 = load(pair["b"]), load(pair["b"], dtype="bfloat16")
    for code in codes:
        want, got = (reconstruct_layer(patched, e, code) for e in (f32, b16))
        for x, y in ((want.keys, got.keys), (want.values, got.values)):
            err = (x.float() - y.float()).norm() / x.float().norm()
            assert got.keys.dtype == f32.kv_dtype and err < 0.05, (code.layer, float(err))
    worker = _worker(cluster, pair, str(pair["art"]), "batched", cluster.prefill_port, "bfloat16")
    try:
        r = _run(worker, pair["prompts"][2][:200])
    finally:
        worker.batch.close()
    s = r["spectrumkv"]
    assert s["outcome"] == "ok" and s["method"] == "scd" and s["reconstruct_s"] > 0, s
    assert len(token_ids(r)) == 4


def test_fuzzer_quick_mode_covers_scd_payloads():
    report = fuzz.run_fuzz(900, seed=4, samples=8)
    assert report.bad == 0, report.examples[:2]
    scd = {k: v for k, v in report.by_mutation.items() if k.startswith("scd/")}
    assert len(scd) == len(MUTATIONS) and all(sum(c.values()) > 0 for c in scd.values())
    reached = " | ".join(report.errors_by_mutation["scd/resealed_tier_map"])
    reached += " | ".join(report.errors_by_mutation["scd/resealed_frame_head"])
    assert "does not match its tier map" in reached and "ChecksumError" not in reached
