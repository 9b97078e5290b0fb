import msgspec
import pytest
import torch

from spectrumkv import fused
from spectrumkv.config import PolicyConfig, QuantConfig
from spectrumkv.errors import ChecksumError, IncompatiblePayloadError, WireFormatError
from spectrumkv.kv import LayerKV
from spectrumkv.payload import decode_payload
from spectrumkv.pipeline import encode
from spectrumkv.policy import plan
from spectrumkv.quant import dequantize, quantize
from spectrumkv.tiers import Tier
from spectrumkv.wire import (
    _PREAMBLE,
    MAX_HEADER_BYTES,
    VERSION,
    Fingerprint,
    frame_bytes,
    read_frame,
    read_header,
)

from .synthetic import make_header, random_layers


class Pre:
    def __init__(self, layers):
        self.layers = layers


def _payload(n=40, policy="spectrum", budget=0.4, quant=None, **kw):
    header = make_header(n, quant=quant, budget=budget, policy=policy, **kw)
    pre = Pre(random_layers(header))
    scores = torch.rand(n, generator=torch.Generator().manual_seed(7))
    p = plan(scores, header, PolicyConfig(policy, budget=budget, quant=quant or QuantConfig(8)))
    return header, pre, p, encode(header, pre, p)


@pytest.mark.parametrize(
    "quant", [QuantConfig(8), QuantConfig(16, rotate=False), QuantConfig(8, "sym-token", False)]
)
def test_round_trip_matches_per_tier_codec(quant):
    header, pre, p, payload = _payload(quant=quant, budget=0.45)
    assert len(payload) == p.wire_bytes
    out = decode_payload(payload, expect=header.fingerprint)
    assert out.header == header
    for layer, (src, got) in enumerate(zip(pre.layers, out.layers, strict=True)):
        t = p.tiers[layer]
        assert torch.equal(got.positions, (t != Tier.DROP).nonzero().flatten())
        for j, pos in enumerate(got.positions.tolist()):
            tier = Tier(int(t[pos]))
            for a, b in ((src.keys, got.keys), (src.values, got.values)):
                x = a[:, pos : pos + 1].transpose(0, 1)
                want = (
                    x
                    if tier == Tier.FP16
                    else dequantize(quantize(x, tier, quant), tier, quant, x.shape[-1])
                )
                assert torch.equal(b[:, j], want[0].to(b.dtype))


def test_fp16_tier_is_bit_exact():
    header, pre, p, payload = _payload(budget=1.0)
    out = decode_payload(payload)
    for src, got in zip(pre.layers, out.layers, strict=True):
        assert torch.equal(src.keys, got.keys) and torch.equal(src.values, got.values)


def test_sliding_layers_carry_only_their_window():
    header, pre, p, payload = _payload(n=30, n_layers=3, sliding=(0, 2), window=9, budget=0.6)
    out = decode_payload(payload)
    assert out.layers[0].positions.min() >= 30 - 8
    assert out.layers[1].positions.min() < 30 - 8


def test_step_read_bytes_counts_a_window_in_sliding_layers():
    fp = Fingerprint("gemma3", 6, 2, 16, "float16", "default", 8, (0, 1, 2, 3, 4), "0" * 16)
    layer_token = 2 * 2 * 16 * 2  # K and V, 2 heads, head_dim 16, fp16
    assert fp.step_read_bytes([4, 20], 2) == layer_token * (24 + 5 * (4 + 8))
    full = Fingerprint("llama", 6, 2, 16, "float16", "default", 0, (), "0" * 16)
    assert full.step_read_bytes([4, 20], 2) == full.kv_token_bytes(2) * 24


def test_every_single_byte_corruption_is_detected():
    _, _, _, payload = _payload(n=12, budget=0.5)
    for i in range(len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x5A
        with pytest.raises((WireFormatError, IncompatiblePayloadError)):
            decode_payload(bytes(bad))


def test_truncation_and_extension_are_detected():
    _, _, _, payload = _payload(n=12)
    for cut in range(0, len(payload), 7):
        with pytest.raises(WireFormatError):
            decode_payload(payload[:cut])
    with pytest.raises(WireFormatError, match="unexpected bytes"):
        decode_payload(payload + b"\0")


def test_wrong_model_is_refused():
    header, _, _, payload = _payload()
    other = header.fingerprint.__class__(
        **{
            **{f: getattr(header.fingerprint, f) for f in header.fingerprint.__struct_fields__},
            "weights_digest": "f" * 16,
        }
    )
    with pytest.raises(IncompatiblePayloadError, match="weights_digest"):
        decode_payload(payload, expect=other)


def test_oversized_header_is_refused_before_reading():
    forged = _PREAMBLE.pack(b"SPKV", VERSION, 0, MAX_HEADER_BYTES + 1) + b"\0" * 16
    with pytest.raises(WireFormatError, match="exceeds"):
        read_header(forged)


def test_future_version_is_incompatible_and_garbage_is_malformed():
    _, _, _, payload = _payload()
    bad = bytearray(payload)
    bad[4] = 9
    with pytest.raises(IncompatiblePayloadError, match="version"):
        decode_payload(bytes(bad))
    with pytest.raises(WireFormatError, match="magic"):
        decode_payload(b"GET / HTTP/1.1\r\n\r\n" * 4)


def test_frames_out_of_order_are_refused():
    header, pre, p, payload = _payload(n_layers=3)
    from spectrumkv.pipeline import iter_payload

    chunks = list(iter_payload(header, pre, p))
    swapped = chunks[0] + chunks[1] + chunks[3] + chunks[2]
    with pytest.raises(WireFormatError, match="expected frame for layer 1, got layer 2"):
        decode_payload(swapped)


def test_flipped_payload_byte_is_a_checksum_error():
    _, _, _, payload = _payload(n=40)
    bad = bytearray(payload)
    bad[-20] ^= 0x01  # inside the last frame's codes
    with pytest.raises(ChecksumError, match="frame 1 checksum"):
        decode_payload(bytes(bad))


def test_kivi2_round_trip_and_exact_size():
    quant = QuantConfig(32, "kivi", rotate=False)
    header = make_header(300, quant=quant, policy="kivi2", budget=None, head_dim=32)
    pre = Pre(random_layers(header))
    p = plan(torch.rand(300), header, PolicyConfig("kivi2", budget=None, quant=quant))
    payload = encode(header, pre, p)
    assert len(payload) == p.wire_bytes and 0.2 < p.wire_budget < 0.35
    out = decode_payload(payload)
    t = p.tiers[0]
    assert (t[-32:] == Tier.FP16).all() and (t[:-32] == Tier.INT2).all()
    src = pre.layers[0]
    assert torch.equal(out.layers[0].keys[:, -32:], src.keys[:, -32:])
    rel = (out.layers[0].keys[:, :-32] - src.keys[:, :-32]).pow(2).mean() / src.keys.pow(2).mean()
    assert rel < 0.3


def test_frames_are_bound_to_their_header():
    """Two payloads of the same shape, policy and plan differ only in payload_id: a frame moved
    from one to the other fails its checksum instead of decoding as the wrong request's KV."""
    header, pre, p, payload = _payload(n=20)
    other = msgspec.structs.replace(header, payload_id=header.payload_id + 1)
    other_payload = encode(other, pre, p)
    _, start = read_header(payload)
    spliced = other_payload[:start] + payload[start:]
    with pytest.raises(ChecksumError, match="frame 0"):
        decode_payload(spliced)
    assert decode_payload(other_payload).header.payload_id == header.payload_id + 1


def test_tokens_digest_identifies_the_prompt():
    from spectrumkv.wire import tokens_digest

    a = tokens_digest([1, 2, 3])
    assert a == tokens_digest(torch.tensor([1, 2, 3])) != 0
    assert a != tokens_digest([1, 2, 4]) and a != tokens_digest([1, 2, 3, 0])


@pytest.fixture(params=["fused", "reference"])
def codec(request):
    """Run a test on the compiled codec and on the torch reference."""
    previous = fused.set_reference(request.param == "reference")
    yield request.param
    fused.set_reference(previous)


@pytest.mark.parametrize(
    "tiers,error",
    [
        (torch.full((8,), 9), "invalid tier code"),
        (torch.full((8,), 9, dtype=torch.uint8), "invalid tier code"),
        (torch.full((8,), -1), "invalid tier code"),
        (torch.full((8,), -252), "invalid tier code"),  # would wrap to FP16 as uint8
        (torch.full((5,), 3), r"layer KV is \(2, 8, 16\); .* say \(2, 5, 16\)"),
        (torch.full((12,), 3), r"layer KV is \(2, 8, 16\); .* say \(2, 12, 16\)"),
        (torch.full((2, 4), 3), "one-dimensional integer"),
        (torch.full((8,), 3.0), "one-dimensional integer"),
    ],
)
def test_encoding_rejects_a_bad_tier_list_on_either_codec(tiers, error, codec):
    """Before, the reference path wrote frames for unknown codes and wrong-length lists, which
    only the receiver could reject."""
    header = make_header(8)
    with pytest.raises(ValueError, match=error):
        frame_bytes(0, 0, tiers, random_layers(header)[0], header)


@pytest.mark.parametrize(
    "shape,dtypes,error",
    [
        ((3, 8, 16), (torch.float16, torch.float16), r"say \(2, 8, 16\) \(KV heads"),
        ((2, 8, 32), (torch.float16, torch.float16), r"say \(2, 8, 16\) \(KV heads"),
        ((2, 8, 16), (torch.float64, torch.float64), "must be float16, bfloat16 or float32"),
        ((2, 8, 16), (torch.int32, torch.int32), "must be float16, bfloat16 or float32"),
        ((2, 8, 16), (torch.float16, torch.bfloat16), "keys and values alike"),
    ],
)
def test_encoding_rejects_a_layer_the_header_does_not_describe(shape, dtypes, error, codec):
    """Both codecs give the same clear error (before: a buffer-size or memoryview error, and
    the reference encoded float64 or integer caches)."""
    header = make_header(8)
    kv = LayerKV(torch.ones(shape).to(dtypes[0]), torch.ones(shape).to(dtypes[1]), torch.arange(8))
    with pytest.raises(ValueError, match=error):
        frame_bytes(0, 0, torch.full((8,), int(Tier.INT8)), kv, header)


@pytest.mark.parametrize(
    "shapes,dtype,error",
    [
        (((2, 4, 16), (2, 4, 16)), torch.float16, "holds 4 slots, frame keeps 8"),
        (((3, 8, 16), (3, 8, 16)), torch.float16, "must be contiguous"),
        (((2, 8, 16), (2, 8, 16)), torch.bfloat16, "must be contiguous"),
        (((2, 8, 16), (2, 10, 16)), torch.float16, "must be contiguous"),
    ],
)
def test_decoding_rejects_a_destination_that_cannot_hold_the_frame(shapes, dtype, error, codec):
    """Before, the reference path raised torch's RuntimeError or wrote into tensors of another
    dtype or capacity."""
    header = make_header(8)
    kv = random_layers(header)[0]
    frame = bytes(frame_bytes(0, 0, torch.full((8,), int(Tier.INT8)), kv, header))
    out = tuple(torch.empty(s, dtype=dtype) for s in shapes)
    with pytest.raises(ValueError, match=error):
        read_frame(frame, 0, header, 0, out=out)
    strided = tuple(torch.empty(2, 16, 8, dtype=torch.float16).transpose(1, 2) for _ in range(2))
    with pytest.raises(ValueError, match="must be contiguous"):
        read_frame(frame, 0, header, 0, out=strided)
    roomy = tuple(torch.empty(2, 10, 16, dtype=torch.float16) for _ in range(2))
    got, _, _ = read_frame(frame, 0, header, 0, out=roomy)
    assert got.keys.data_ptr() == roomy[0].data_ptr() and got.keys.shape == (2, 8, 16)


@pytest.mark.parametrize(
    "group,error",
    [
        (32, "group_size 32 is not the group its fingerprint implies"),  # wider than head_dim
        (12, "bad quantization parameters"),
        (16, "does not match its tier map"),  # a legal group, but not the one the frames use
    ],
)
def test_a_header_group_size_its_fingerprint_does_not_imply_is_refused(group, error, codec):
    """Checksums re-sealed, so the check behind them is reached. Before, the reference decoded
    group_size 32 on head_dim 16 as 16, and the compiled decoder raised a bare ValueError
    (HTTP 500 in the PD worker, a full load_timeout_s wait in the vLLM receiver)."""
    from spectrumkv.bench.mutations import seal

    header = make_header(8, n_layers=2)  # head_dim 16, group 8
    tiers = torch.full((8,), int(Tier.INT4))
    layers = random_layers(header)
    frames = [bytes(frame_bytes(i, 0, tiers, kv, header))[:-8] for i, kv in enumerate(layers)]
    bad = msgspec.structs.replace(header, group_size=group)
    payload = seal(msgspec.msgpack.encode(bad), frames)
    with pytest.raises(WireFormatError, match=error) as e:
        decode_payload(payload, expect=header.fingerprint)
    assert not isinstance(e.value, ChecksumError)
    if group != 16:  # nor does either encoder write a header the receiver would refuse
        with pytest.raises(WireFormatError, match=error):
            frame_bytes(0, 0, tiers, layers[0], bad)
