"""The compiled codec against the torch reference: identical bytes out, identical tensors back."""

import json
import os

import msgspec
import numpy as np
import pytest
import torch
import xxhash

from spectrumkv import fused
from spectrumkv.bench import memory
from spectrumkv.config import QuantConfig
from spectrumkv.errors import WireFormatError
from spectrumkv.kv import LayerKV
from spectrumkv.tiers import Tier
from spectrumkv.wire import (
    CHECK_BLOCK,
    frame_bytes,
    frame_checksum,
    frame_checksum_reference,
    frame_seed,
    read_frame,
    read_tier_map,
)

from .synthetic import make_header


def test_extension_is_built():
    assert fused.AVAILABLE, "spectrumkv._codec did not compile; see setup.py (needs a C compiler)"


def _cache(h, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(h, n, d, generator=g) * 3
    v = torch.randn(h, n, d, generator=g)
    if n:
        k[:, :, 1] += 40  # an outlier channel, as real keys have
        k[:, 0] = 0.0  # an all-zero token: scale 0
        v[:, -1] = 2.5  # a constant token
        v[0, n // 2, :8] = 60000.0  # near the FP16 limit
        k[-1, n // 3, :32] = 60000.0  # rotated, beyond the FP16 range: the kernels clamp
        if dtype != torch.float16:
            k[0, n // 3, -1] = 1e5  # beyond it before rotation too
    return LayerKV(k.to(dtype), v.to(dtype), torch.arange(n))


def _both_ways(kv, tiers, header):
    a = frame_bytes(0, 0, tiers, kv, header, fused=True)
    b = frame_bytes(0, 0, tiers, kv, header, fused=False)
    assert a == b
    got_f, map_f, end_f = read_frame(a, 0, header, 0, fused=True)
    got_r, map_r, end_r = read_frame(a, 0, header, 0, fused=False)
    assert end_f == end_r == len(a) and torch.equal(map_f, map_r)
    for x, y in ((got_f.keys, got_r.keys), (got_f.values, got_r.values)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
    assert torch.equal(got_f.positions, got_r.positions)
    return got_f


@pytest.fixture(params=["simd", "scalar"])
def kernels(request):
    """Run a test on the AVX2 kernels (where the CPU has them) and on the scalar C kernels."""
    previous = fused.set_simd(request.param == "simd")
    yield request.param
    fused.set_simd(previous)


@pytest.mark.parametrize("n", [0, 1, 7, 64])
@pytest.mark.parametrize(
    "head_dim,group", [(16, 8), (64, 64), (128, 32), (128, 64), (128, 128), (256, 64)]
)
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_matches_reference(n, head_dim, group, rotate, wire, src_dtype, kernels):
    header = make_header(n, heads=3, head_dim=head_dim, quant=QuantConfig(group, rotate=rotate))
    fp = msgspec.structs.replace(header.fingerprint, kv_dtype=wire)
    header = msgspec.structs.replace(header, fingerprint=fp)
    kv = _cache(3, n, head_dim, src_dtype, seed=n + head_dim)
    tiers = torch.randint(0, len(Tier), (n,), generator=torch.Generator().manual_seed(n))
    got = _both_ways(kv, tiers, header)
    kept = tiers != int(Tier.DROP)
    assert torch.equal(got.positions, kept.nonzero().flatten())
    fp16 = (tiers[kept] == int(Tier.FP16)).nonzero().flatten()
    want = kv.keys[:, kept][:, fp16].to(got.keys.dtype)
    assert torch.equal(got.keys[:, fp16].view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("n", [0, 33])
@pytest.mark.parametrize("head_dim", [36, 80, 96, 100, 112])
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_head_dims_that_are_not_powers_of_two(n, head_dim, rotate, src_dtype, kernels):
    """One geometry for both codecs (`QuantConfig.geometry`): group 16 or 32 for group_size 64,
    rotation in power-of-two blocks. Before, the compiled encoder rotated past the end of the
    vector (garbage), the reference refused, and group_size 64 did not fit 80/96/112 at all."""
    header = make_header(n, heads=2, head_dim=head_dim, quant=QuantConfig(64, rotate=rotate))
    kv = _cache(2, n, head_dim, src_dtype, seed=n + head_dim)
    g = torch.Generator().manual_seed(n)
    tiers = torch.randint(0, len(Tier), (n,), generator=g)
    _both_ways(kv, tiers, header)
    x = torch.randn(2, n, head_dim, generator=g).to(src_dtype)
    got, _, _ = read_frame(
        frame_bytes(0, 0, tiers, LayerKV(x, x, torch.arange(n)), header), 0, header, 0
    )
    keep = tiers != int(Tier.DROP)
    int8 = (tiers[keep] == int(Tier.INT8)).nonzero().flatten()
    if int8.numel():  # INT8 decodes close to the original: not garbage
        want = x[:, keep][:, int8].float()
        assert (got.values[:, int8].float() - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("d,g", [(96, 24), (96, 2), (98, 2), (96, 64), (8192, 64)])
def test_compiled_codec_refuses_geometries_the_config_cannot_make(d, g):
    """The C checks the geometry itself (group a power of two >= 4 dividing head_dim, head_dim a
    multiple of 4 up to MAX_HEAD_DIM), with rotation on, so no block boundary splits a group."""
    x = torch.zeros(d)
    tiers = np.full(1, int(Tier.INT8), dtype=np.uint8)
    with pytest.raises(ValueError, match="geometry"):
        fused._codec.encode_frame(
            x.data_ptr(), x.data_ptr(), 0, 1, 1, d, g, 1, 1, tiers, bytearray(4 * d), 1
        )
    with pytest.raises(ValueError, match="geometry"):
        fused._codec.decode_frame(
            bytes(4 * d), tiers, 1, 1, d, g, 1, 1, x.data_ptr(), x.data_ptr(), 0, 1, 1, 1
        )


@pytest.mark.model
def test_fused_matches_reference_on_a_real_cache(smol):
    from spectrumkv import chat_ids, prefill
    from spectrumkv.config import PolicyConfig
    from spectrumkv.pipeline import make_header as header_for

    pre = prefill(smol, chat_ids(smol, "Explain how a refrigerator keeps food cold.")[:-1])
    header = header_for(smol, pre.n_tokens, PolicyConfig("spectrum", budget=0.4))
    g = torch.Generator().manual_seed(3)
    for layer in (0, 13, 29):
        tiers = torch.randint(0, len(Tier), (pre.n_tokens,), generator=g)
        _both_ways(pre.layers[layer], tiers, header)


_SEEDS = (0, 1, 2**64 - 1, 0x9E3779B97F4A7C15)


def test_compiled_xxh3_matches_the_xxhash_package_at_every_length(kernels):
    """With the whole buffer as head and no body, the checksum is xxh3_64 of the buffer itself:
    every length through the small (0-16), medium (17-240) and long (several 1 KiB blocks) paths."""
    raw = np.random.default_rng(0).integers(0, 256, 3200, dtype=np.uint8).tobytes()
    for n in range(len(raw) + 1):
        for seed in _SEEDS[:2] if n % 7 else _SEEDS:
            got = fused.frame_checksum(raw[:n], n, seed, 1)
            assert got == xxhash.xxh3_64_intdigest(raw[:n], seed), (n, seed)


@pytest.mark.parametrize(
    "size",
    [0, 5, 16, 17, 300, CHECK_BLOCK + 15, CHECK_BLOCK + 16, CHECK_BLOCK + 17, 3 * CHECK_BLOCK + 9],
)
def test_threaded_frame_checksum_matches_the_reference(size, kernels):
    raw = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for seed in _SEEDS:
        want = frame_checksum_reference(raw, seed)
        for threads in (1, 2, 3, 8):
            assert fused.frame_checksum(raw, min(16, size), seed, threads) == want
    flipped = bytearray(raw)
    if size:
        flipped[size - 1] ^= 1
        assert fused.frame_checksum(bytes(flipped), min(16, size), 5, 2) != fused.frame_checksum(
            raw, min(16, size), 5, 2
        )


@pytest.mark.parametrize("n", [0, 1, 2, 7, 4096, 4097])
def test_compiled_tier_map_reader_matches_numpy(n, monkeypatch):
    g = np.random.default_rng(n)
    for trial in range(20):
        codes = g.integers(0, len(Tier), n, dtype=np.uint8)
        if trial == 1:
            codes[:] = 0  # all dropped
        raw = bytearray(np.pad(codes, (0, n % 2)).reshape(-1, 2) @ np.array([1, 16], np.uint8))
        if trial >= 10 and raw:
            raw[g.integers(len(raw))] |= 0xF0 if trial % 2 else 0x0F  # a bad code (or padding)
        results = []
        for reference in (False, True):
            monkeypatch.setattr(fused, "_reference", reference)
            try:
                tiers, positions, counts = read_tier_map(bytes(raw), n, 100)
                results.append((tiers.tolist(), positions.tolist(), counts))
            except WireFormatError:
                results.append("error")
        assert results[0] == results[1]
        if trial < 10:
            assert results[0][0] == codes.tolist()
            assert results[0][1] == (np.flatnonzero(codes) + 100).tolist()


def test_reference_mode_writes_and_reads_the_same_frames():
    """Reference mode (torch codec, xxhash-package checksums) is byte-compatible."""
    header = make_header(3000, heads=2, head_dim=64, quant=QuantConfig(64))
    kv = _cache(2, 3000, 64, torch.float16, seed=3)
    tiers = torch.randint(0, len(Tier), (3000,), generator=torch.Generator().manual_seed(3))
    fast = bytes(frame_bytes(0, 0, tiers, kv, header))
    assert len(fast) > 2 * CHECK_BLOCK  # several checksum blocks
    previous = fused.set_reference(True)
    try:
        assert not fused.compiled() and not fused.enabled(header.quant)
        assert bytes(frame_bytes(0, 0, tiers, kv, header)) == fast
        got, _, _ = read_frame(fast, 0, header, 0)
    finally:
        assert fused.set_reference(previous) is True
    assert fused.compiled()
    want, _, _ = read_frame(fast, 0, header, 0)
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_the_environment_switches_a_new_process_to_reference_mode():
    import subprocess
    import sys

    code = "from spectrumkv import fused; print(fused.compiled())"
    for value, want in (("reference", "False"), ("auto", "True")):
        env = {**os.environ, "SPECTRUMKV_CODEC": value}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.stdout.strip() == want, run.stderr


def test_kernel_rejects_a_body_that_does_not_match_the_tier_map():
    header = make_header(8, heads=2, head_dim=16)
    kv = _cache(2, 8, 16, torch.float16, seed=1)
    tiers = torch.full((8,), int(Tier.INT4))
    frame = frame_bytes(0, 0, tiers, kv, header, fused=True)
    body = memoryview(frame)[16 + 4 : -8]
    geo = QuantConfig(8).geometry(16)
    with pytest.raises(ValueError, match="does not match"):
        fused.decode_body(body[:-1], tiers, 2, geo, torch.float16, 8)
    with pytest.raises(ValueError, match="invalid tier"):
        fused.decode_body(body, torch.full((8,), 9), 2, geo, torch.float16, 8)
    with pytest.raises(ValueError, match="does not match"):
        out = memoryview(bytearray(len(frame) - 16 - 8 - 1))
        fused.encode_body(kv.keys, kv.values, tiers, geo, torch.float16, out)
    # sections hold the FP16 tier in 16 bits: a float32 wire dtype would overrun them
    with pytest.raises(ValueError, match="dtype"):
        out = memoryview(bytearray(len(frame) - 16 - 8))
        fused.encode_body(kv.keys, kv.values, tiers, geo, torch.float32, out)
    with pytest.raises(ValueError, match="dtype"):
        fused.decode_body(body, tiers, 2, geo, torch.float32, 8)


def test_encode_and_decode_into_reused_buffers(kernels):
    header = make_header(40, heads=2, head_dim=64, quant=QuantConfig(64))
    kv = _cache(2, 40, 64, torch.float16, seed=4)
    tiers = torch.randint(0, len(Tier), (40,), generator=torch.Generator().manual_seed(4))
    fresh = frame_bytes(0, 0, tiers, kv, header)
    send = bytearray(len(fresh) + 100)
    assert bytes(frame_bytes(0, 0, tiers, kv, header, out=send)) == bytes(fresh)
    send = bytearray(b"\xa5" * len(send))  # stale bytes everywhere: each one is overwritten
    assert bytes(frame_bytes(0, 0, tiers, kv, header, out=send)) == bytes(fresh)
    with pytest.raises(ValueError, match="needs"):
        frame_bytes(0, 0, tiers, kv, header, out=bytearray(len(fresh) - 1))
    want, _, _ = read_frame(fresh, 0, header, 0)
    recv = (torch.full((2, 40, 64), 7.0).half(), torch.full((2, 40, 64), 7.0).half())
    for use_fused in (True, False):
        got, _, _ = read_frame(fresh, 0, header, 0, fused=use_fused, out=recv)
        assert got.keys.data_ptr() == recv[0].data_ptr()
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_concurrent_callers_and_sleeping_helpers_give_the_reference_bytes():
    """Four Python threads encode and decode frames of mixed sizes at once, some after pauses
    long enough for the pool's helpers to fall asleep: each call either runs alone or splits
    its job with helpers that claim their shares late or not at all, and every frame and every
    decoded tensor must still be the reference's. (The 4096-token frames are big enough to wake
    the pool on their own; the smaller ones use it only when it is awake or busy.)"""
    import random
    import threading
    import time

    cases = []
    for n in (16, 512, 4096):
        header = make_header(n, heads=4, head_dim=64, quant=QuantConfig(64), budget=None)
        kv = _cache(4, n, 64, torch.bfloat16, seed=n)
        tiers = torch.randint(0, len(Tier), (n,), generator=torch.Generator().manual_seed(n))
        frame = bytes(frame_bytes(0, 0, tiers, kv, header, fused=False))
        want, _, _ = read_frame(frame, 0, header, 0, fused=False)
        cases.append((header, tiers, kv, frame, want))
    errors: list[str] = []

    def run(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            header, tiers, kv, frame, want = rng.choice(cases)
            if rng.random() < 0.4:
                time.sleep(rng.uniform(0.0005, 0.003))
            if bytes(frame_bytes(0, 0, tiers, kv, header)) != frame:
                errors.append(f"encode of {tiers.numel()} slots differs")
            got, _, _ = read_frame(frame, 0, header, 0)
            if not (torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)):
                errors.append(f"decode of {tiers.numel()} slots differs")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a codec call hung"
    assert errors == []


@pytest.mark.parametrize("head_dim,group", [(16, 8), (64, 64), (128, 32), (128, 64)])
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_in_the_cache_gives_the_reference_bytes_and_decodes_to_nan(
    head_dim, group, rotate, src_dtype, kernels
):
    """A NaN anywhere in a group (first, middle or last value; any sign or payload) gives the
    reference's canonical bytes on every kernel: scale = minimum = 0x7E00, codes 0. Decoded, that
    group (with rotation, which spreads a NaN over the row: the whole row) is NaN and nothing
    else is: the NaN is carried, not turned into a plausible number. Infinities saturate."""
    n, h = 24, 2
    header = make_header(n, heads=h, head_dim=head_dim, quant=QuantConfig(group, rotate=rotate))
    kv = _cache(h, n, head_dim, torch.float32, seed=head_dim + group)
    k = kv.keys.view(torch.int32).clone()
    hits = [(0, 2, 0), (1, 5, group // 2), (0, 9, group - 1), (1, 9, head_dim - 1), (0, 20, 0)]
    payloads = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC10000]
    for (head, slot, channel), bits in zip(hits, payloads, strict=True):
        k[head, slot, channel] = bits - (1 << 32) if bits >= 1 << 31 else bits
    keys = k.view(torch.float32)
    keys[1, 13, 3] = float("inf")  # saturates to 65504, no NaN
    keys[0, 14, -1] = float("-inf")
    kv = LayerKV(keys.to(src_dtype), kv.values.to(src_dtype), kv.positions)
    tiers = torch.tensor([int(Tier.INT8), int(Tier.INT4), int(Tier.INT2)] * (n // 3))
    got = _both_ways(kv, tiers, header)
    nan = torch.zeros(h, n, head_dim // group, dtype=torch.bool)
    for head, slot, channel in hits:
        nan[head, slot, channel // group] = True
    if rotate:
        nan[:] = nan.any(-1, keepdim=True)
    want = nan.repeat_interleave(group, -1)
    assert torch.equal(torch.isnan(got.keys), want)
    assert not torch.isnan(got.values).any()


@pytest.mark.parametrize("rotate", [True, False])
def test_non_finite_scales_decode_as_the_reference_does(rotate, kernels):
    """Bytes may carry an infinite or NaN scale or minimum (the reference encoder writes a NaN
    minimum for a NaN in the cache): the decoder's NaN handling then runs. NaN comes out where
    the reference has NaN (torch's own NaN bits differ between its code paths), including for
    NaN payloads that plain rounding to bfloat16 would carry into the sign bit (-0.0)."""
    header = make_header(16, heads=2, head_dim=64, quant=QuantConfig(64, rotate=rotate))
    fp = msgspec.structs.replace(header.fingerprint, kv_dtype="bfloat16")
    header = msgspec.structs.replace(header, fingerprint=fp)
    kv = _cache(2, 16, 64, torch.bfloat16, seed=5)
    frame = bytearray(frame_bytes(0, 0, torch.full((16,), int(Tier.INT8)), kv, header))
    # after the 16-byte frame head and the 8-byte tier map, the K section: 16 x 2 rows of 64
    # codes, then 32 scales, then 32 minima
    scales = 16 + 8 + 16 * 2 * 64
    for entry, bits in ((3, 0x7C00), (9, 0xFC00), (40, 0x7FFF)):  # +inf, -inf scale; NaN min
        frame[scales + 2 * entry : scales + 2 * entry + 2] = bits.to_bytes(2, "little")
    frame[-8:] = frame_checksum(memoryview(frame)[:-8], frame_seed(header)).to_bytes(8, "little")
    got_f, _, _ = read_frame(frame, 0, header, 0, fused=True)
    got_r, _, _ = read_frame(frame, 0, header, 0, fused=False)
    nan = torch.isnan(got_r.keys)
    assert nan.any() and torch.equal(torch.isnan(got_f.keys), nan)
    assert torch.equal(got_f.keys[~nan].view(torch.int16), got_r.keys[~nan].view(torch.int16))
    assert torch.equal(got_f.values.view(torch.int16), got_r.values.view(torch.int16))


def test_bench_codec_quick_mode_reports_the_issue_fields(tmp_path, capsys):
    from spectrumkv.cli import main

    out = tmp_path / "codec.json"
    assert main(["bench", "codec", "--quick", "--reference", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    keys = {"policy", "budget", "dtype", "encode_gbps", "decode_gbps", "copy_gbps",
            "encode_ratio", "decode_ratio"}  # fmt: skip
    assert len(records) == 16 and all(keys <= r.keys() for r in records)
    fused_rows = [r for r in records if r["codec"] == "fused"]
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in fused_rows)
    spectrum = [r for r in records if r["policy"] == "spectrum"]
    assert all(abs(r["wire_ratio"] - r["budget"]) < 0.01 for r in spectrum)
    assert "fused kernels" in capsys.readouterr().out
    if memory.available():  # Linux: peak temporaries of one layer's encode and decode
        for r in records:
            temps = r["encode_temp_bytes"], r["decode_temp_bytes"]
            assert all(t is not None and t >= 0 for t in temps)
        # the torch reference holds float32 copies of whole sections (the compiled codec's
        # bound is in test_bench_memory.py, on a layer big enough to dwarf thread stacks)
        reference = [r for r in records if r["codec"] == "reference"]
        assert all(r["encode_temp_bytes"] > r["layer_bytes"] for r in reference)
