"""The blur substrate (engine/mixing.gaussian_blur, issue 28): computed by FFT along each axis, it gives the
values of the direct separable convolution with replicate padding, on any image size and sigma."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcim_cli.engine import mixing


def direct(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The definition: pad each axis by ceil(3 sigma) with its edge values, convolve with the normalised
    Gaussian, in float64."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = x.shape
    y = x.double().reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


@pytest.mark.parametrize(("shape", "sigma"), [((2, 3, 128, 128), 8.0), ((1, 2, 24, 32), 8.0),
                                               ((1, 1, 5, 7), 3.0), ((1, 3, 200, 90), 2.5),
                                               ((1, 5, 300, 257), 8.0)])
def test_fft_blur_equals_the_direct_separable_convolution(shape: tuple[int, ...], sigma: float) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 3
    x[..., : shape[-2] // 3, :] += 5  # edges and steps: the replicate padding matters
    got = mixing.gaussian_blur(x, sigma)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), direct(x, sigma), rtol=2e-6, atol=1e-6)  # float32 rounding
    torch.testing.assert_close(mixing.gaussian_blur(x.double(), sigma), direct(x, sigma), rtol=0, atol=1e-12)
    # a half-precision input takes the direct path: the same values to its precision
    torch.testing.assert_close(mixing.gaussian_blur(x.half(), sigma).double(), direct(x, sigma), rtol=0, atol=2e-2)


def test_no_blur_at_zero_sigma() -> None:
    x = torch.rand(1, 2, 9, 9)
    assert mixing.gaussian_blur(x, 0.0) is x
