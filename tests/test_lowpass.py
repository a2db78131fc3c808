"""The Gaussian low-pass filter on one LoRA factor gradient."""

import pytest
import torch

from peft_lalora import ConfigError, lowpass_filter


@pytest.mark.parametrize("factor,shape", [("A", (4, 32)), ("B", (32, 4))])
def test_constant_is_unchanged(factor, shape):
    grad = torch.full(shape, 3.25)
    torch.testing.assert_close(lowpass_filter(grad, factor), grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", ["A", "B"])
def test_alternating_pattern_is_attenuated_8x(factor):
    # +1/-1 along the filtered axis (d_in for A, d_out for B); the other axis varies freely
    n, r = 40, 4
    signs = torch.tensor([(-1.0) ** i for i in range(n)])
    grad = signs.view(1, n).repeat(r, 1) if factor == "A" else signs.view(n, 1).repeat(1, r)
    out = lowpass_filter(grad, factor)
    # the kernel's response at the Nyquist frequency is (1 - 4 + 6 - 4 + 1) / 16 = 0 inside; reflect edges stay small
    assert out.abs().max() <= grad.abs().max() / 8


@pytest.mark.parametrize("factor", ["A", "B"])
def test_nothing_mixes_along_the_rank_axis(factor):
    # one rank slice holds a signal, the others are zero: after filtering they must stay exactly zero
    n, r = 16, 4
    grad = torch.zeros(r, n) if factor == "A" else torch.zeros(n, r)
    if factor == "A":
        grad[1] = torch.randn(n)
    else:
        grad[:, 1] = torch.randn(n)
    out = lowpass_filter(grad, factor)
    zero_slices = [0, 2, 3]
    for k in zero_slices:
        slice_ = out[k] if factor == "A" else out[:, k]
        assert torch.equal(slice_, torch.zeros(n))


def test_matches_hand_computed_convolution_with_reflect_padding():
    row = torch.tensor([[0.0, 16.0, 0.0, 0.0, 0.0, 0.0]])
    # reflect-padded: [0, 16, | 0, 16, 0, 0, 0, 0 | 0, 0]; kernel (1,4,6,4,1)/16
    expected = torch.tensor([[4.0 + 4.0, 6.0 + 1.0, 4.0, 1.0, 0.0, 0.0]])  # the reflected 16 adds 1 at index 1
    torch.testing.assert_close(lowpass_filter(row, "A"), expected)


def test_shape_dtype_preserved_and_kernel_normalised():
    grad = torch.randn(3, 10, dtype=torch.float64)
    out = lowpass_filter(grad, "A", kernel=(2.0, 8.0, 12.0, 8.0, 2.0))
    assert out.shape == grad.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, lowpass_filter(grad, "A"))  # a scaled kernel gives the same filter


def test_bad_input():
    with pytest.raises(ConfigError, match="`factor` must be 'A' or 'B'"):
        lowpass_filter(torch.zeros(2, 8), "C")
    with pytest.raises(ConfigError, match="2-D"):
        lowpass_filter(torch.zeros(8), "A")
