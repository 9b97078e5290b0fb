import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumkv.config import QuantConfig
from spectrumkv.errors import ConfigError
from spectrumkv.quant import dequantize, element_bytes, hadamard, pack, quantize, unpack
from spectrumkv.tiers import Tier


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_pack_unpack_identity(bits, rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    d = groups * 8
    codes = torch.randint(0, 1 << bits, (rows, 3, d), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == d * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_hadamard_is_orthonormal_and_symmetric():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)
    assert torch.equal(h, h.T)
    with pytest.raises(ValueError):
        hadamard(48)


@pytest.mark.parametrize("tier", [Tier.INT8, Tier.INT4, Tier.INT2])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("group", [16, 64])
def test_asym_group_error_bound(tier, rotate, group):
    """Per element, |x - x_hat| <= scale/2 plus FP16 rounding of the group's parameters,
    measured in the (rotated) domain where the quantizer works."""
    torch.manual_seed(1)
    x = torch.randn(50, 3, 64) * 4
    x[:, :, 5] += 30  # an outlier channel, as real keys have
    q = QuantConfig(group_size=group, rotate=rotate)
    qz = quantize(x, tier, q)
    xr = dequantize(qz, tier, q, 64)
    h = hadamard(64) if rotate else torch.eye(64)
    err = ((xr - x) @ h).abs().view(50, 3, 64 // group, group)
    xg = (x @ h).view(50, 3, 64 // group, group)
    span = xg.amax(-1) - xg.amin(-1)
    bound = qz.scale.float() / 2 + (xg.abs().amax(-1) + span) * 2**-9 + 1e-5
    assert (err <= bound[..., None]).all()
    levels = (1 << {Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}[tier]) - 1
    rel = float(((xr - x) ** 2).mean() / (x**2).mean())
    assert rel < {8: 1e-4, 4: 0.05, 2: 0.5}[levels.bit_length()]


def test_rotation_reduces_int4_error_with_outlier_channels():
    torch.manual_seed(2)
    x = torch.randn(200, 3, 64)
    x[:, :, 3] *= 20
    plain = QuantConfig(rotate=False)
    rot = QuantConfig(rotate=True)
    e_plain = (dequantize(quantize(x, Tier.INT4, plain), Tier.INT4, plain, 64) - x).pow(2).mean()
    e_rot = (dequantize(quantize(x, Tier.INT4, rot), Tier.INT4, rot, 64) - x).pow(2).mean()
    assert e_rot < 0.6 * e_plain


def test_sym_token_matches_paper_quantizer():
    torch.manual_seed(3)
    x = torch.randn(20, 2, 32)
    q = QuantConfig(scheme="sym-token", rotate=False)
    qz = quantize(x, Tier.INT4, q)
    assert qz.scale.shape == (20,) and qz.minimum is None
    xr = dequantize(qz, Tier.INT4, q, 32)
    absmax = x.view(20, -1).abs().amax(-1)
    assert ((xr - x).abs().view(20, -1).amax(-1) <= absmax / 7 / 2 * 1.01 + 1e-6).all()


def test_constant_group_round_trips_exactly():
    x = torch.full((4, 1, 16), 0.75)
    q = QuantConfig(group_size=16, rotate=False)
    for tier in (Tier.INT8, Tier.INT4, Tier.INT2):
        assert torch.equal(dequantize(quantize(x, tier, q), tier, q, 16), x)


def test_element_bytes_counts_scales():
    q = QuantConfig(group_size=64)
    assert element_bytes(Tier.FP16, 3, 64, q) == 3 * 64 * 2
    assert element_bytes(Tier.INT8, 3, 64, q) == 3 * (64 + 4)
    assert element_bytes(Tier.INT4, 3, 64, q) == 3 * (32 + 4)
    assert element_bytes(Tier.DROP, 3, 64, q) == 0
    assert element_bytes(Tier.INT4, 3, 64, QuantConfig(scheme="sym-token")) == 3 * 32 + 2


def test_bad_quant_config_is_rejected():
    with pytest.raises(ConfigError):
        QuantConfig(group_size=48)
    with pytest.raises(ConfigError):
        QuantConfig(scheme="nf4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="multiple of 4"):
        QuantConfig(group_size=64).group_for(42)


@pytest.mark.parametrize(
    "head_dim,group,blocks",
    [(64, 64, (64,)), (32, 32, (32,)), (256, 64, (256,)), (96, 32, (64, 32)),
     (80, 16, (64, 16)), (112, 16, (64, 32, 16)), (12, 4, (8, 4))],
)  # fmt: skip
def test_geometry_fits_any_head_dim(head_dim, group, blocks):
    """Before, head_dim 80/96/112 had no group at group_size 64 (ConfigError) and no rotation."""
    geo = QuantConfig(64).geometry(head_dim)
    assert (geo.group, geo.blocks) == (group, blocks)
    assert all(sum(blocks[:i]) % group == 0 for i in range(len(blocks)))
    assert QuantConfig(64, rotate=False).geometry(head_dim).blocks == ()


@pytest.mark.parametrize("head_dim", [96, 80, 48])
def test_block_rotation_is_orthonormal_and_helps_int4_on_outlier_channels(head_dim):
    from spectrumkv.quant import rotate

    geo = QuantConfig(64).geometry(head_dim)
    eye = torch.eye(head_dim)
    r = rotate(eye, geo.blocks)
    assert torch.allclose(r @ r.T, eye, atol=1e-6) and torch.allclose(r, r.T)
    assert torch.allclose(rotate(rotate(eye * 3, geo.blocks), geo.blocks), eye * 3, atol=1e-5)
    torch.manual_seed(0)
    x = torch.randn(256, 2, head_dim)
    x[..., 3] += 30  # an outlier channel, as real keys have
    err = {}
    for rot in (True, False):
        q = QuantConfig(64, rotate=rot)
        y = dequantize(quantize(x, Tier.INT4, q), Tier.INT4, q, head_dim)
        err[rot] = float(((y - x) ** 2).mean() / (x**2).mean())
    assert err[True] < 0.7 * err[False], err


def test_kivi_keys_are_quantized_per_channel():
    torch.manual_seed(4)
    x = torch.randn(70, 2, 32)
    x[:, :, 7] *= 50  # an outlier channel costs only its own channel's precision
    q = QuantConfig(group_size=32, scheme="kivi", rotate=False)
    qz = quantize(x, Tier.INT2, q, is_key=True)
    assert qz.scale.shape == (3, 2, 32)  # ceil(70 / 32) blocks of tokens, per channel
    xr = dequantize(qz, Tier.INT2, q, 32, is_key=True)
    err = (xr - x).abs()
    assert err[:, :, 7].max() > 10 * err[:, :, :7].max() / 3  # error follows the channel range
    span = x.view(70, -1).amax(0) - x.view(70, -1).amin(0)
    assert (err.view(70, -1) <= span / 3 / 2 * 1.01 + span * 2**-9 + 1e-5).all()
    values = quantize(x, Tier.INT2, q, is_key=False)
    assert values.scale.shape == (70, 2, 1)  # values per token


def _with_bits(x: torch.Tensor, where: tuple[int, int, int], bits: int) -> torch.Tensor:
    y = x.clone()
    y.view(torch.int32)[where] = bits - (1 << 32) if bits >= 1 << 31 else bits
    return y


@pytest.mark.parametrize("scheme", ["asym-group", "sym-token", "kivi"])
@pytest.mark.parametrize("tier", [Tier.INT8, Tier.INT4, Tier.INT2])
def test_a_nan_gives_canonical_bytes_and_spoils_only_its_own_group(scheme, tier):
    """A NaN's group (asym-group: its group of channels; sym-token: its token; kivi keys: its
    channel over its block of tokens) is written as FP16 NaN parameters and codes 0, whatever
    the NaN's sign or payload, and decodes to NaN; every other value decodes exactly as it does
    with a 0 in the NaN's place. A NaN code cast to uint8 used to be arbitrary: in a packed byte
    it could spill into a neighbouring channel's bits."""
    q = QuantConfig(group_size=8, scheme=scheme, rotate=False)
    x = torch.randn(20, 2, 16, generator=torch.Generator().manual_seed(1))
    where = (9, 1, 4)
    zero = _with_bits(x, where, 0)
    got = [quantize(_with_bits(x, where, b), tier, q, is_key=True) for b in
           (0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF)]  # fmt: skip
    for other in got[1:]:
        for a, b in zip(vars(got[0]).values(), vars(other).values(), strict=True):
            assert a is None or torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    nan_back = dequantize(got[0], tier, q, 16, is_key=True)
    zero_back = dequantize(quantize(zero, tier, q, is_key=True), tier, q, 16, is_key=True)
    spoiled = torch.zeros_like(x, dtype=torch.bool)
    if scheme == "asym-group":
        spoiled[9, 1, :8] = True
    elif scheme == "sym-token":
        spoiled[9] = True
    else:
        spoiled[8:16, 1, 4] = True  # block of 8 tokens holding token 9, channel 4
    assert torch.equal(nan_back.isnan(), spoiled)
    assert torch.equal(nan_back[~spoiled], zero_back[~spoiled])
    codes = unpack(got[0].codes, {Tier.INT8: 8, Tier.INT4: 4, Tier.INT2: 2}[tier])
    assert (codes[spoiled] == 0).all()  # not whatever a NaN becomes when cast to uint8
