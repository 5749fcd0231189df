"""The PCIM mixing layer and the images it composes: pure tensor functions, no state.

Notation (docs/method.md): x is a batch (B, C, H, W); w are the mixing logits,
one per pixel (B, 1, h, w) or per pixel and channel (B, C, h, w), at the full or a reduced resolution
(h = ceil(H / resolution)). alpha = softmax(w) over every pixel(-channel) of one image, so it is
non-negative and sums to 1. The paper-style mixing weight is n * alpha (n = number of weights), which
is exactly 1 everywhere when w = 0, so the mixed image is x itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def pixel_softmax(w: torch.Tensor) -> torch.Tensor:
    """alpha: softmax over all weights of each image (every dim but the first)."""
    flat = w.flatten(1)
    return torch.softmax(flat, dim=1).view_as(w)


def mixing_weights(w: torch.Tensor, budget: float | torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel mixing weights at the resolution of w.

    budget None: n * alpha, the un-clamped PCIM mixing (weights may exceed 1: pixels are amplified).
    budget in (0, 1]: min(1, budget * n * alpha): alpha spends a fixed share of the image, and no pixel
    is ever amplified. budget = 1 and w = 0 still give weights of exactly 1. A (B,) tensor gives each
    image its own budget.
    """
    flat = w.flatten(1)
    # n * alpha = exp(w - lse(w) + lse(0)): at w = 0 both log-sum-exps are the same float, so exactly 1
    lse_uniform = torch.logsumexp(torch.zeros_like(flat[:1]), dim=1)
    n_alpha = torch.exp(flat - torch.logsumexp(flat, dim=1, keepdim=True) + lse_uniform).view_as(w)
    if budget is None:
        return n_alpha
    if isinstance(budget, torch.Tensor):
        budget = budget.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(n_alpha * budget, max=1.0)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of low-resolution weights to the image size (identity at full size).

    Interpolating m - 1 (whose untouched value is exactly 0) keeps a weight of 1 exactly 1, so w = 0
    gives back x bit for bit at any resolution.
    """
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return 1 + F.interpolate(m - 1, size=size, mode="bilinear", align_corners=False)


def compose(x: torch.Tensor, m: torch.Tensor, substrate: torch.Tensor | None) -> torch.Tensor:
    """m * x + (1 - m) * substrate; with no substrate, the paper's plain m * x.

    As one `torch.lerp` from the substrate to x (one pass over the images instead of four, ~5 % of a
    fit step on small classifiers): exactly x where m = 1 and exactly the substrate where m = 0, and
    within float32 rounding of the two-product form in between."""
    if substrate is None:
        return m * x
    return torch.lerp(substrate, x, m)


def weight_shape(x_shape: torch.Size, per_channel: bool, resolution: int) -> tuple[int, int, int, int]:
    """Shape of the mixing logits for a batch of images of shape x_shape."""
    b, c, h, w = x_shape
    return (b, c if per_channel else 1, math.ceil(h / resolution), math.ceil(w / resolution))


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """The normalised 1-D Gaussian (2 * radius + 1 taps, radius = ceil(3 sigma)) and its radius."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype), radius


#: rows (or columns) blurred per FFT call: keeps a call's working set in the CPU caches on large fields
FFT_BLOCK = 64


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur per channel with replicate padding (any sigma, any image size): separable, each axis
    convolved by FFT.

    The same values as the direct separable convolution with the 2 * ceil(3 sigma) + 1 taps of
    `gaussian_kernel` (to float32 rounding, ~5e-7; tests/test_blur.py): each row is padded by the radius
    with its edge values, so the FFT's circular convolution never wraps around into the outputs kept. On a
    CPU a 1 x 49 `conv2d` on single channels was 5-15x slower (benchmarks/bench_field_costs.py).
    """
    if sigma <= 0:
        return x
    if x.dtype not in (torch.float32, torch.float64):
        return _blur_direct(x, sigma)
    b, c, h, w = x.shape
    k, r = gaussian_kernel(sigma, x.dtype)
    y = _blur_last_axis(x.reshape(b * c, h, w), k.to(x.device), r)
    y = _blur_last_axis(y.transpose(1, 2), k.to(x.device), r).transpose(1, 2)
    return y.reshape(b, c, h, w).contiguous()


def _blur_last_axis(y: torch.Tensor, k: torch.Tensor, r: int) -> torch.Tensor:
    """y (N, R, L) convolved along its last axis with k (2r + 1 taps), edges replicated; blocks of rows."""
    n, rows, length = y.shape
    size = _fast_fft_length(length + 2 * r)
    taps = torch.zeros(size, dtype=y.dtype, device=y.device)
    taps[: r + 1], taps[size - r :] = k[r:], k[:r]  # centred on index 0 of the circular convolution
    kf = torch.fft.rfft(taps)
    out = torch.empty(n, rows, length, dtype=y.dtype, device=y.device)
    for start in range(0, rows, FFT_BLOCK):
        part = y[:, start : start + FFT_BLOCK]
        padded = torch.cat([part[..., :1].expand(-1, -1, r), part, part[..., -1:].expand(-1, -1, r)], dim=-1)
        full = torch.fft.irfft(torch.fft.rfft(padded, n=size) * kf, n=size)
        out[:, start : start + FFT_BLOCK] = full[..., r : r + length]
    return out


def _fast_fft_length(n: int) -> int:
    """The smallest length >= n with no prime factor above 5 (fast for every FFT library)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _blur_direct(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The separable blur as two direct convolutions (dtypes torch.fft does not take, e.g. float16)."""
    k, radius = gaussian_kernel(sigma, x.dtype)
    k = k.to(x.device)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def channel_median(x: torch.Tensor) -> torch.Tensor:
    """The median of each channel of each image (B, C), as torch's `median`: the lower of the two middle
    values of an even count. On a CPU by numpy's selection (np.partition), 15x faster than torch's
    median on a 2160 x 2160 channel (15 ms against 230 ms) and the same value; elsewhere torch's."""
    flat = x.flatten(2)
    if (flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64) or flat.shape[2] == 0
            or flat.requires_grad):
        return flat.median(dim=2).values
    k = (flat.shape[2] - 1) // 2
    return torch.from_numpy(np.partition(flat.numpy(), k, axis=2)[..., k].copy())


def substrate(x: torch.Tensor, kind: str, blur_sigma: float) -> torch.Tensor | None:
    """The image that masked-out pixels are replaced with: none (paper: plain m*x), zero, mean, median
    (per channel and image: the background level while the evidence covers less than half of the image,
    where the mean drifts towards the evidence as it grows), blur."""
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if kind == "median":
        return channel_median(x)[..., None, None].expand_as(x)
    if kind == "blur":
        return gaussian_blur(x, blur_sigma)
    raise ValueError(f"unknown substrate {kind!r}; expected none, zero, mean, median or blur")
