"""Amortised PCIM: a small network that predicts the mixing logits of every class in one forward pass.

The per-image fit (pcim.py) spends `steps` forward + backward passes of the classifier on every map.
An explainer E (Dabkowski & Gal 2017, "Real time image saliency for black box classifiers"; Stalder
et al. 2022, "What you see is what you classify") is trained once per classifier, on many images, to
output the logits that fit would reach: E(x) is (B, K * M, h, w), for every class k the logits w_k of
the map of target k (M = 1 shared map, or one per input channel; h, w = the weights' resolution,
`weight_shape`). One forward of E then gives the maps of all targets.

The training objective is exactly the per-image one, evaluated at w = E(x)[target]: the kept and
deleted images composed by mixing.py with the budgeted softmax weights, the capped log-probabilities
of pcim.objective_loss plus pcim.regularisers, the classifier frozen (only its input gradient is used, as
in the fit). Maps are made exactly as the fit makes them: `amortised_pcim` hands the explainer's logits
to fit_pcim as its starting point and runs `refine_steps` steps of the per-image fit from there (0 = no
fit: the maps and probabilities of the explainer's logits themselves, through the same code).

Pure torch: tensors, a classifier callable and an explainer module in, tensors out; no files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pcim_cli.engine import mixing
from pcim_cli.engine.pcim import (
    FastForward,
    Forward,
    FrozenModel,
    PcimOptions,
    PcimResult,
    fit_pcim,
    objective_loss,
    regularisers,
)


def _groups(channels: int) -> int:
    return math.gcd(channels, 4)


class _Block(nn.Sequential):
    """3x3 convolution (stride 1 or 2, 'same' padding), GroupNorm, ReLU. A stride-2 block makes an H x W
    input ceil(H/2) x ceil(W/2), so four of them reach exactly the weights' grid at 1/4 after two."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(_groups(cout), cout),
                         nn.ReLU())


class Explainer(nn.Module):
    """A small U-Net: four stride-2 blocks down to 1/16, two decoder blocks with skip connections back
    to 1/4, a 1x1 convolution to K * M logit maps, resized to the weights' grid ceil(H/r) x ceil(W/r).

    ~0.16 M parameters at width 16. GroupNorm (per image), no dropout: an image's logits never depend on
    the other images of its batch, in training or in use. Fully convolutional: any H, W.
    """

    def __init__(self, in_channels: int, n_classes: int, maps_per_class: int = 1, resolution: int = 4,
                 width: int = 16):
        super().__init__()
        w = width
        self.in_channels, self.n_classes, self.maps_per_class = in_channels, n_classes, maps_per_class
        self.resolution, self.width = resolution, width
        self.enc1 = _Block(in_channels, w, 2)  # 1/2
        self.enc2 = _Block(w, 2 * w, 2)  # 1/4
        self.enc3 = _Block(2 * w, 4 * w, 2)  # 1/8
        self.enc4 = _Block(4 * w, 4 * w, 2)  # 1/16
        self.dec3 = _Block(8 * w, 4 * w)  # 1/8: up(enc4) + enc3
        self.dec2 = _Block(6 * w, 2 * w)  # 1/4: up(dec3) + enc2
        self.head = nn.Conv2d(2 * w, n_classes * maps_per_class, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        e4 = self.enc4(e3)
        d3 = self.dec3(torch.cat([F.interpolate(e4, size=[e3.shape[-2], e3.shape[-1]], mode="bilinear",
                                                align_corners=False), e3], 1))
        d2 = self.dec2(torch.cat([F.interpolate(d3, size=[e2.shape[-2], e2.shape[-1]], mode="bilinear",
                                                align_corners=False), e2], 1))
        out = self.head(d2)
        r = self.resolution
        size = [(h + r - 1) // r, (w + r - 1) // r]
        if out.shape[-2] != size[0] or out.shape[-1] != size[1]:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def maps_per_class(opts: PcimOptions, in_channels: int) -> int:
    """M: one shared map per class, or one per input channel (opts.per_channel)."""
    return in_channels if opts.per_channel else 1


def make_explainer(in_channels: int, n_classes: int, opts: PcimOptions, width: int = 16, seed: int = 0) -> Explainer:
    """An untrained explainer for these settings; its initial weights depend only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Explainer(in_channels, n_classes, maps_per_class(opts, in_channels), opts.resolution, width)


def class_logits(out: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
    """The logits (B, M, h, w) of each row's target class from an explainer output (B, K * M, h, w)."""
    b, _, h, w = out.shape
    return out.view(b, -1, m, h, w)[torch.arange(b, device=out.device), target]


def _budgets(opts: PcimOptions, b: int, x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(k, per-row budgets of the k-times repeated batch), as fit_pcim lays them out."""
    if not opts.budgets:
        return 1, None
    return len(opts.budgets), torch.tensor(opts.budgets, dtype=x.dtype, device=x.device).repeat_interleave(b)


def objective(model: Forward, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
              opts: PcimOptions) -> torch.Tensor:
    """The per-image fit's loss (B,) at logits w (B, M, h, w): differentiable in w, the model frozen.

    The kept image m * x + (1 - m) * keep substrate and (keep-delete) the deleted image
    (1 - m) * x + m * delete substrate go through the model as one batch, as in fit_pcim; several
    budgets give the mean loss over them.
    """
    b, _, h, wd = x.shape
    k, budgets = _budgets(opts, b, x)
    xs, ws, ts = x.repeat(k, 1, 1, 1), w.repeat(k, 1, 1, 1), target.repeat(k)
    keep_sub = mixing.substrate(xs, opts.keep_substrate, opts.blur_sigma)
    del_sub = mixing.substrate(xs, opts.delete_substrate, opts.blur_sigma)
    if del_sub is None:
        del_sub = torch.zeros_like(xs)
    m_low = mixing.mixing_weights(ws, budgets)
    m = mixing.upsample(m_low, (h, wd))
    kept = mixing.compose(xs, m, keep_sub)
    dual = opts.objective == "keep-delete"
    batch = torch.cat([kept, mixing.compose(xs, 1 - m.clamp(max=1.0), del_sub)]) if dual else kept
    logits = model(batch)
    n = xs.shape[0]
    loss = objective_loss(logits[:n], logits[n:] if dual else None, ts, opts) + regularisers(ws, m_low, opts)
    return loss.view(k, b).mean(0)


def explainer_loss(explainer: nn.Module, model: Forward, x: torch.Tensor, target: torch.Tensor,
                   opts: PcimOptions) -> torch.Tensor:
    """Per-image PCIM objective (B,) of the explainer's logits for the targets; differentiable in E."""
    w = class_logits(explainer(x).float(), target, maps_per_class(opts, x.shape[1]))
    return objective(model, x, w, target, opts)


def train_step(explainer: nn.Module, model: Forward, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               target: torch.Tensor, opts: PcimOptions) -> float:
    """One optimiser step of the explainer on a batch; the classifier stays frozen. Returns the mean loss."""
    explainer.train()
    with FrozenModel(model):
        loss = explainer_loss(explainer, model, x, target.to(device=x.device, dtype=torch.long), opts).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass(frozen=True)
class TrainOptions:
    """How an explainer is trained (defaults measured: docs/method.md, "Amortised PCIM")."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 2e-3  # peak of the one-cycle schedule (Adam)
    width: int = 16  # channels of the explainer's first block
    seed: int = 0  # initial weights, and the crops of every step
    other_targets: float = 0.25  # share of crops trained for a class other than the predicted one

    def __post_init__(self) -> None:
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("steps", "batch_size", "width")
                    if getattr(self, k) < 1]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.other_targets < 1:
            problems.append(f"other_targets must be in [0, 1), got {self.other_targets}")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))


class Trainer:
    """Trains an explainer on crops of in-memory images (C, H, W), one `step()` at a time.

    Each step draws `batch_size` crops of `crop` px at random positions of random images, each flipped /
    rotated by a multiple of 90 degrees at random, targets them at the classifier's predicted class (or,
    for a share `other_targets`, at another class: the explainer answers for every class), and takes one
    Adam step with a one-cycle learning-rate schedule. A step's crops depend only on (seed, step), and
    `state_dict` / `load_state_dict` carry the rest, so a run resumed from a saved state ends exactly
    where an uninterrupted one does (on the same device and thread count).
    """

    def __init__(self, model: Forward, images: Sequence[torch.Tensor], n_classes: int, opts: PcimOptions,
                 topts: TrainOptions, crop: tuple[int, int], device: str | torch.device = "cpu",
                 precision: str = "float32"):
        if not images:
            raise ValueError("no images to train on")
        if any(im.shape[-2] < crop[0] or im.shape[-1] < crop[1] for im in images):
            raise ValueError(f"every image must be at least the {crop[0]}x{crop[1]} crop")
        self.model = model if precision == "float32" else FastForward(model, precision)
        self.images, self.n_classes, self.opts, self.topts = list(images), n_classes, opts, topts
        self.crop, self.device = (int(crop[0]), int(crop[1])), device
        self.net = make_explainer(images[0].shape[0], n_classes, opts, topts.width, topts.seed).to(device)
        self.runner = self.net if precision == "float32" else FastForward(self.net, precision)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=topts.lr)
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=topts.lr,
                                                            total_steps=topts.steps, pct_start=0.15)
        self.done = 0
        self.losses: list[float] = []

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of step `step` and their targets: a function of (seed, step) alone."""
        g = torch.Generator().manual_seed(self.topts.seed * 1_000_003 + step)
        ch, cw = self.crop
        crops = []
        for i in torch.randint(len(self.images), (self.topts.batch_size,), generator=g).tolist():
            im = self.images[i]
            y0 = int(torch.randint(im.shape[-2] - ch + 1, (1,), generator=g))
            x0 = int(torch.randint(im.shape[-1] - cw + 1, (1,), generator=g))
            crops.append(_augment(im[:, y0 : y0 + ch, x0 : x0 + cw], int(torch.randint(8, (1,), generator=g))))
        x = torch.stack(crops).contiguous().to(self.device)
        target = predicted(self.model, x)
        if self.n_classes > 1 and self.topts.other_targets > 0:
            other = (torch.rand(len(x), generator=g) < self.topts.other_targets).to(target.device)
            shift = torch.randint(1, self.n_classes, (len(x),), generator=g).to(target.device)
            target = torch.where(other, (target + shift) % self.n_classes, target)
        return x, target

    def step(self) -> float:
        """One training step; returns its mean objective."""
        x, target = self.batch(self.done)
        loss = train_step(self.runner, self.model, self.optimizer, x, target, self.opts)
        self.schedule.step()
        self.done += 1
        self.losses.append(loss)
        return loss

    def validation(self, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
        """Mean objective on held-out images x (targets: the predicted classes)."""
        if not len(x):
            return float("nan")
        x = x.to(self.device)
        target = predicted(self.model, x) if target is None else target
        return mean_objective(self.runner, self.model, x, target, self.opts, self.topts.batch_size * 2)

    def state_dict(self) -> dict[str, Any]:
        return {"explainer": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "done": self.done, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["explainer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.done, self.losses = int(state["done"]), list(state["losses"])


def _augment(x: torch.Tensor, op: int) -> torch.Tensor:
    """One of the 8 flips / rotations by 90 degrees of a square crop (of the 4 flips of another)."""
    if x.shape[-1] == x.shape[-2]:
        x = torch.rot90(x, op % 4, dims=(-2, -1)) if op % 4 else x
        return x.flip(-1) if op >= 4 else x
    if op & 1:
        x = x.flip(-1)
    return x.flip(-2) if op & 2 else x


@torch.no_grad()
def predicted(model: Forward, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The classifier's predicted class of each image."""
    if not len(x):
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


@torch.no_grad()
def mean_objective(explainer: nn.Module, model: Forward, x: torch.Tensor, target: torch.Tensor,
                   opts: PcimOptions, batch: int = 16) -> float:
    """The mean objective of the explainer's logits over (x, target), in chunks (validation)."""
    explainer.eval()
    total = 0.0
    with FrozenModel(model):
        for i in range(0, len(x), batch):
            xb, tb = x[i : i + batch], target[i : i + batch].to(device=x.device, dtype=torch.long)
            total += float(explainer_loss(explainer, model, xb, tb, opts).sum())
    return total / max(1, len(x))


@torch.no_grad()
def explainer_logits(explainer: Forward, x: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's target logits (B, M, h, w); rows equal to the row before share one explainer forward
    (the (tile, target) units of one tile come in a row), so a tile costs one forward for all targets."""
    b = x.shape[0]
    first = [0] + [i for i in range(1, b) if not torch.equal(x[i], x[i - 1])]
    owner = torch.zeros(b, dtype=torch.long, device=x.device)
    for j, start in enumerate(first):
        owner[start:] = j
    out = explainer(x[first]).float()
    return class_logits(out[owner], target, m)


def amortised_pcim(model: Forward, explainer: Forward, x: torch.Tensor, target: torch.Tensor,
                   opts: PcimOptions, seeds: torch.Tensor | None = None,
                   prob_original: torch.Tensor | None = None) -> PcimResult:
    """PCIM maps (B, M, H, W) from the explainer's logits, refined by `opts.refine_steps` steps of the
    per-image fit at `opts.refine_lr` (0: none). The result has fit_pcim's form; `steps` counts the
    refine steps. prob_original (B,): p(target | x) when known (fit_pcim then makes no forward for it)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    x = x.detach()
    target = target.to(device=x.device, dtype=torch.long).reshape(x.shape[0])
    w = explainer_logits(explainer, x, target, maps_per_class(opts, x.shape[1]))
    refine = dataclasses.replace(opts, steps=opts.refine_steps, lr=opts.refine_lr)
    return fit_pcim(model, x, target, refine, seeds=seeds, init=w, prob_original=prob_original)
