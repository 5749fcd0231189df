"""The PCIM mixing layer and the images it composes: pure tensor functions, no state.

Notation (docs/method.md): x is a batch (B, C, H, W); w are the mixing logits,
one per pixel (B, 1, h, w) or per pixel and channel (B, C, h, w), at the full or a reduced resolution
(h = ceil(H / resolution)). alpha = softmax(w) over every pixel(-channel) of one image, so it is
non-negative and sums to 1. The paper-style mixing weight is n * alpha (n = number of weights), which
is exactly 1 everywhere when w = 0, so the mixed image is x itself.
"""

from __future__ import annotations

import math

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
    """m * x + (1 - m) * substrate; with no substrate, the paper's plain m * x."""
    if substrate is None:
        return m * x
    return m * x + (1 - m) * substrate


def weight_shape(x_shape: torch.Size, per_channel: bool, resolution: int) -> tuple[int, int, int, int]:
    """Shape of the mixing logits for a batch of images of shape x_shape."""
    b, c, h, w = x_shape
    return (b, c if per_channel else 1, math.ceil(h / resolution), math.ceil(w / resolution))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel with replicate padding (any sigma, any image size)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def substrate(x: torch.Tensor, kind: str, blur_sigma: float) -> torch.Tensor | None:
    """The image that masked-out pixels are replaced with: none (paper: plain m*x), zero, mean, blur."""
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if kind == "blur":
        return gaussian_blur(x, blur_sigma)
    raise ValueError(f"unknown substrate {kind!r}; expected none, zero, mean or blur")
