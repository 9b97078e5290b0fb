"""engines._bf16dot (few-row bf16 products on AVX512-BF16) through engines.packed: its layout,
accuracy against float64, rows independent of each other and of the thread count, and which
rows a PackedLinear sends to it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectrumkv.engines import packed

needs_kernel = pytest.mark.skipif(
    packed._bf16dot is None or not packed._bf16dot.available(),
    reason="no AVX512-BF16 on this CPU",  # a missing build fails test_extension_is_built
)


def test_extension_is_built():
    assert packed._bf16dot is not None  # setup.py builds it wherever gcc does


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_dot_layout_puts_16_columns_of_a_feature_pair_in_one_row():
    w = torch.arange(32 * 6, dtype=torch.float32).view(32, 6).to(torch.bfloat16)
    d = packed.dot_layout(w)
    assert d.shape == (2, 3, 16, 2) and d.is_contiguous()
    for b, p, i, j in [(0, 0, 0, 0), (0, 2, 15, 1), (1, 1, 3, 0), (1, 2, 15, 1)]:
        assert d[b, p, i, j] == w[16 * b + i, 2 * p + j]


@needs_kernel
def test_dot_matmul_is_within_bf16_rounding_of_float64():
    w, x = _bf16(3072, 576, seed=1), _bf16(16, 576, seed=2)
    y = packed.dot_matmul(x, packed.dot_layout(w))
    exact = x.double() @ w.double().T
    assert y.dtype == torch.bfloat16 and y.shape == (16, 3072)
    # one rounding to bf16 (2^-9 relative) plus the float32 sums' error
    bound = exact.abs() * 2**-8 + 1e-3 * exact.abs().max()
    assert ((y.double() - exact).abs() <= bound).all()
    # and as accurate as oneDNN's product overall
    err = (y.double() - exact).abs().max()
    assert err <= 1.5 * (F.linear(x, w).double() - exact).abs().max()


@needs_kernel
def test_dot_matmul_rows_do_not_depend_on_other_rows_or_threads():
    """Batch invariance: a row's bits are the same alone, in any batch, on 1 or 2 threads."""
    w_dot = packed.dot_layout(_bf16(960, 1536, seed=3))
    x = _bf16(40, 1536, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([packed.dot_matmul(x[i : i + 1], w_dot) for i in range(40)])
        torch.set_num_threads(2)
        for rows in (1, 7, 16, 17, 40):
            assert torch.equal(packed.dot_matmul(x[:rows], w_dot), alone[:rows])
    finally:
        torch.set_num_threads(threads)
    assert packed.dot_matmul(x[:0], w_dot).shape == (0, 960)


def test_packed_linear_sends_only_few_rows_to_the_kernel():
    """Where DOT holds, rows up to DOT_ROWS take the kernel and more take oneDNN (bit-identical
    to F.linear); elsewhere every product is oneDNN's. Leading dims are kept."""
    if not packed.available():
        pytest.skip("no oneDNN bf16 on this CPU: models stay unpacked")
    lin = nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    layer = packed.PackedLinear(lin)
    assert (layer.dot is not None) == packed.DOT
    w = lin.weight.detach()
    big = _bf16(packed.DOT_ROWS + 1, 576, seed=5)
    assert torch.equal(layer(big), F.linear(big, w))
    few = big[: packed.DOT_ROWS]
    want = packed.dot_matmul(few, layer.dot) if packed.DOT else F.linear(few, w)
    assert torch.equal(layer(few), want)
    assert layer(_bf16(2, 3, 576, seed=6)).shape == (2, 3, 1536)


@needs_kernel
def test_dot_matmul_refuses_inputs_it_does_not_take():
    w_dot = packed.dot_layout(_bf16(32, 64, seed=7))
    x = _bf16(3, 64, seed=8)
    for bad_x, bad_w in [
        (x[:, :62], w_dot),  # wrong feature count
        (x.float(), w_dot),  # not bf16
        (x, w_dot.float()),
        (x, w_dot.transpose(0, 1)),  # not the layout
        (x, w_dot[:, :, :8]),
    ]:
        with pytest.raises(ValueError):
            packed.dot_matmul(bad_x, bad_w)
