"""Hook-free reference attributions (pure torch), for comparison with PCIM.

All take (model, x (B, C, H, W), target (B,)) and return non-negative maps (B, 1, H, W).
"""

from __future__ import annotations

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


def random_map(model: Forward, x: torch.Tensor, target: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Uniform noise: the chance level every method must beat."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    return torch.rand((b, 1, h, w), generator=g).to(x.device)


def saliency(model: Forward, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|d logit_t / d x|, max over channels (Simonyan et al. 2014)."""
    return _target_grad(model, x, target).abs().amax(dim=1, keepdim=True)


def integrated_gradients(model: Forward, x: torch.Tensor, target: torch.Tensor, steps: int = 50,
                         baseline: torch.Tensor | None = None) -> torch.Tensor:
    """|sum over channels of IG| with a zero baseline and a midpoint Riemann sum (Sundararajan 2017)."""
    baseline = torch.zeros_like(x) if baseline is None else baseline
    total = torch.zeros_like(x)
    for k in range(steps):
        a = (k + 0.5) / steps
        total += _target_grad(model, baseline + a * (x - baseline), target)
    return ((x - baseline) * total / steps).sum(dim=1, keepdim=True).abs()


@torch.no_grad()
def occlusion(model: Forward, x: torch.Tensor, target: torch.Tensor, window: int = 16,
              stride: int = 8) -> torch.Tensor:
    """Drop in p(target) when a window is set to the channel mean, averaged over covering windows."""
    b, _, h, w = x.shape
    t = target.long().view(-1, 1)
    base = torch.softmax(model(x), 1).gather(1, t)[:, 0]
    fill = x.mean(dim=(2, 3), keepdim=True)
    heat = torch.zeros(b, 1, h, w, device=x.device)
    cover = torch.zeros(1, 1, h, w, device=x.device)
    ys = list(range(0, max(h - window, 0) + 1, stride))
    xs = list(range(0, max(w - window, 0) + 1, stride))
    for y0 in ys:
        for x0 in xs:
            occ = x.clone()
            occ[:, :, y0 : y0 + window, x0 : x0 + window] = fill.expand(-1, -1, window, window)[
                :, :, : min(window, h - y0), : min(window, w - x0)]
            drop = base - torch.softmax(model(occ), 1).gather(1, t)[:, 0]
            heat[:, :, y0 : y0 + window, x0 : x0 + window] += drop.view(b, 1, 1, 1)
            cover[:, :, y0 : y0 + window, x0 : x0 + window] += 1
    return F.relu(heat / cover.clamp(min=1))


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "random": random_map,
    "saliency": saliency,
    "integrated-gradients": integrated_gradients,
    "occlusion": occlusion,
}
