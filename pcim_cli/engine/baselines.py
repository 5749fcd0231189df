"""Hook-free reference attributions (pure torch), for comparison with PCIM.

All take (model, x (B, C, H, W), target (B,)) and return non-negative maps (B, 1, H, W), or
(B, C, H, W) with per_channel=True where the method has a per-channel form. `attribute.py` uses
Captum's implementations of saliency, integrated gradients and occlusion when Captum is installed
and these otherwise; RISE is only here. `intensity` needs no model at all (the trivial baseline of
engine/trivial.py; the other one, `contrast`, is pcim.deletion_contrast).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


def _target_grad(model: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    logits = model(x)
    score = logits.gather(1, target.long().view(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, x)
    return g


def _target_prob(model: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x), 1).gather(1, target.long().view(-1, 1))[:, 0]


def random_map(model: Forward, x: torch.Tensor, target: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform noise: the chance level every method must beat."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    return torch.rand((b, 1, h, w), generator=g).to(x.device)


def intensity(x: torch.Tensor, channel: int | torch.Tensor | None = None, per_channel: bool = False) -> torch.Tensor:
    """A channel's intensity as the map, clipped at 0 (no model): the stain itself.

    per_channel: every channel's intensity (B, C, H, W). Otherwise the channel `channel`, one index for
    the batch or one per image (B,), as (B, 1, H, W).
    """
    x = x.detach().clamp(min=0)
    if per_channel:
        return x.clone()
    if channel is None:
        raise ValueError("intensity needs a channel (or per_channel=True)")
    b, c = x.shape[:2]
    index = torch.as_tensor(channel, device=x.device).long().expand(b)
    if bool(((index < 0) | (index >= c)).any()):
        raise ValueError(f"intensity channel {channel} out of range for {c} channel(s)")
    return x[torch.arange(b, device=x.device), index][:, None].clone()


def saliency(model: Forward, x: torch.Tensor, target: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """|d logit_t / d x|, max over channels (Simonyan et al. 2014), or per channel."""
    g = _target_grad(model, x, target).abs()
    return g if per_channel else g.amax(dim=1, keepdim=True)


def integrated_gradients(model: Forward, x: torch.Tensor, target: torch.Tensor, steps: int = 50,
                         baseline: torch.Tensor | None = None, per_channel: bool = False) -> torch.Tensor:
    """|IG| (zero baseline, midpoint Riemann sum; Sundararajan 2017), summed over channels before the
    absolute value, or per channel."""
    baseline = torch.zeros_like(x) if baseline is None else baseline
    total = torch.zeros_like(x)
    for k in range(steps):
        a = (k + 0.5) / steps
        total += _target_grad(model, baseline + a * (x - baseline), target)
    ig = (x - baseline) * total / steps
    return ig.abs() if per_channel else ig.sum(dim=1, keepdim=True).abs()


@torch.no_grad()
def occlusion(model: Forward, x: torch.Tensor, target: torch.Tensor, window: int = 16,
              stride: int = 8, per_channel: bool = False) -> torch.Tensor:
    """Drop in p(target) when a window is set to the channel mean, averaged over covering windows
    (Zeiler & Fergus 2014). per_channel: one channel occluded at a time (C times the cost)."""
    if not per_channel:
        return _occlude(model, x, target, window, stride, slice(None))
    return torch.cat([_occlude(model, x, target, window, stride, slice(c, c + 1)) for c in range(x.shape[1])], 1)


def _occlude(model: Forward, x: torch.Tensor, target: torch.Tensor, window: int, stride: int,
             channels: slice) -> torch.Tensor:
    b, _, h, w = x.shape
    base = _target_prob(model, x, target)
    fill = x.mean(dim=(2, 3), keepdim=True)[:, channels]
    heat = torch.zeros(b, 1, h, w, device=x.device)
    cover = torch.zeros(1, 1, h, w, device=x.device)
    for y0 in _starts(h, window, stride):
        for x0 in _starts(w, window, stride):
            win = (slice(y0, y0 + window), slice(x0, x0 + window))
            occ = x.clone()
            occ[:, channels, win[0], win[1]] = fill.expand_as(occ[:, channels, win[0], win[1]])
            drop = base - _target_prob(model, occ, target)
            heat[:, :, win[0], win[1]] += drop.view(b, 1, 1, 1)
            cover[:, :, win[0], win[1]] += 1
    return F.relu(heat / cover.clamp(min=1))


def _starts(size: int, window: int, stride: int) -> list[int]:
    """Window starts that cover every pixel; the last window may be cut by the edge (as in Captum)."""
    return [k * stride for k in range(math.ceil(max(size - window, 0) / stride) + 1)]


def rise_masks(count: int, shape: tuple[int, int, int], cell: int, p: float,
               generator: torch.Generator) -> torch.Tensor:
    """(count, M, H, W) RISE masks: a random binary grid of cells of `cell` px (each cell kept with
    probability p), upsampled bilinearly to one cell more than the image and cropped at a random shift."""
    m, h, w = shape
    gh, gw = math.ceil(h / cell), math.ceil(w / cell)
    grid = (torch.rand(count, m, gh + 1, gw + 1, generator=generator) < p).float()
    up = F.interpolate(grid, size=((gh + 1) * cell, (gw + 1) * cell), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell, (count,), generator=generator).tolist()
    dx = torch.randint(0, cell, (count,), generator=generator).tolist()
    return torch.stack([up[k, :, dy[k] : dy[k] + h, dx[k] : dx[k] + w] for k in range(count)])


@torch.no_grad()
def rise(model: Forward, x: torch.Tensor, target: torch.Tensor, masks: int = 1000, cell: int = 16,
         p: float = 0.5, seeds: torch.Tensor | None = None, per_channel: bool = False,
         max_batch: int = 128) -> torch.Tensor:
    """RISE (Petsiuk et al. 2018): sum over random masks M_i of p(target | x * M_i) * M_i / (masks * p),
    an estimate of E[p(target) | pixel kept], minus the mean p(target) over the masks (the level of a
    pixel that does not matter; RISE's ranking is unchanged) and clipped at 0.

    Each image draws its own masks from its seed (seeds (B,), default 0..B-1), so its map does not
    depend on the batch. per_channel: independent masks per channel, one map per channel. Masked-out
    pixels become 0 (no signal, after normalisation). At most max_batch masked images per forward.
    """
    b, c, h, w = x.shape
    seeds = torch.arange(b) if seeds is None else seeds.reshape(b)
    m = c if per_channel else 1
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
    out = torch.zeros(b, m, h, w, device=x.device, dtype=x.dtype)
    level = torch.zeros(b, 1, 1, 1, device=x.device, dtype=x.dtype)
    chunk = max(1, max_batch // b)
    for start in range(0, masks, chunk):
        k = min(chunk, masks - start)
        mk = torch.stack([rise_masks(k, (m, h, w), cell, p, g) for g in gens]).to(x.device, x.dtype)  # (B, k, M, H, W)
        batch = (x[:, None] * mk).flatten(0, 1)
        probs = _target_prob(model, batch, target.repeat_interleave(k)).view(b, k, 1, 1, 1).to(x.dtype)
        out += (probs * mk).sum(1)
        level += probs.sum(1)
    return F.relu(out / (masks * p) - level / masks)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "random": random_map,
    "saliency": saliency,
    "integrated-gradients": integrated_gradients,
    "occlusion": occlusion,
    "rise": rise,
}
