"""Fit PCIM mixing weights for a batch of images against a frozen classifier.

Every image in the batch has its own mixing logits w and its own target class; images never
interact (a per-image Adam, per-image early stopping), so an image's map does not depend on which
other images share its batch. The classifier is only called forward and differentiated with respect
to its input: no hooks, no internals, so any TorchScript or torch.export model works.

Per step, one batch of 2k images goes through the model for the k images still fitting: the *kept*
image (the mixing weights applied to x over the keep substrate) and, for the keep-delete objective,
the *deleted* image (the complement). See docs/method.md for the formulations and why the defaults
are what they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pcim_cli.engine import mixing, schedule
from pcim_cli.engine.options import PcimOptions

Forward = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["FastForward", "Forward", "FrozenModel", "PcimOptions", "PcimResult", "attribution_map",
           "deletion_contrast", "fit_pcim", "objective_loss", "regularisers", "target_log_probs"]


@dataclass
class PcimResult:
    """Maps (B, M, H, W) with M = 1 (shared) or C (per channel), non-negative, plus per-image stats."""

    maps: torch.Tensor
    prob_original: torch.Tensor  # p(target | x)
    prob_mixed: torch.Tensor  # p(target | kept image) after the fit
    prob_deleted: torch.Tensor  # p(target | deleted image) after the fit (keep-delete evidence check)
    loss: torch.Tensor  # final loss per image
    steps: torch.Tensor  # Adam steps each image took (< options.steps when stopped early)
    channel: torch.Tensor | None = None  # intensity maps: the channel each image's map shows
    budget: torch.Tensor | None = None  # the budget each image's map ended with (B,); None: no budget


def target_log_probs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and log(1 - p(target)), both computed stably from the logits."""
    lse = torch.logsumexp(logits, dim=1)
    log_p = logits.gather(1, target[:, None])[:, 0] - lse
    others = logits.scatter(1, target[:, None], float("-inf"))
    log_not_p = torch.logsumexp(others, dim=1) - lse
    return log_p, log_not_p


def objective_loss(logits_keep, logits_del, target, opts: PcimOptions) -> torch.Tensor:
    if opts.loss == "logit":
        z_keep = logits_keep.gather(1, target[:, None])[:, 0]
        loss = -z_keep
        if logits_del is not None:
            loss = loss + logits_del.gather(1, target[:, None])[:, 0]
        return loss
    log_p_keep, _ = target_log_probs(logits_keep, target)
    loss = -log_p_keep
    if logits_del is not None:
        _, log_not_p_del = target_log_probs(logits_del, target)
        loss = loss - log_not_p_del
    return loss


def regularisers(w: torch.Tensor, m_low: torch.Tensor, opts: PcimOptions) -> torch.Tensor:
    reg = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if opts.entropy:
        log_alpha = torch.log_softmax(w.flatten(1), dim=1)
        ent = -(log_alpha.exp() * log_alpha).sum(1) / math.log(log_alpha.shape[1])
        reg = reg + opts.entropy * ent
    if opts.tv:
        dy = (m_low[..., 1:, :] - m_low[..., :-1, :]).abs().flatten(1).mean(1)
        dx = (m_low[..., :, 1:] - m_low[..., :, :-1]).abs().flatten(1).mean(1)
        reg = reg + opts.tv * (dx + dy)
    return reg


class _Adam:
    """Adam with per-image step counts, updating only the images still fitting."""

    def __init__(self, w: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = torch.zeros_like(w)
        self.v = torch.zeros_like(w)
        self.t = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)

    def step(self, w: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor, lr: float) -> None:
        self.t[idx] += 1
        t = self.t[idx].to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
        m = self.m[idx].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v = self.v[idx].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        self.m[idx], self.v[idx] = m, v
        m_hat = m / (1 - self.b1**t)
        v_hat = v / (1 - self.b2**t)
        w[idx] -= lr * m_hat / (v_hat.sqrt() + self.eps)


PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FastForward(torch.nn.Module):
    """Speed levers for GPUs around any model, device-agnostic: `precision` bfloat16 / float16 runs the
    forward (and so its backward) under torch.autocast on the input's device type (tensor cores);
    `channels_last` hands the model NHWC inputs (faster convolutions on recent GPUs). Logits come back
    as float32 and PCIM's own arithmetic stays float32. Reduced precision changes maps slightly
    (benchmarks/bench.py measures by how much): prefer bfloat16, whose range matches float32.
    """

    def __init__(self, model: Forward, precision: str = "float32", channels_last: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model, self.precision, self.channels_last = model, precision, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = self.model(x)
        return out.float()


class FrozenModel:
    """Evaluation mode and no parameter gradients for the fit; every flag is restored afterwards.

    Eval mode keeps BatchNorm / dropout from making an image's map depend on its batch companions
    and from updating running statistics; a model handed over in train mode gets it back that way.
    """

    def __init__(self, model: Forward):
        is_module = isinstance(model, torch.nn.Module)
        self.params = [(p, p.requires_grad) for p in model.parameters()] if is_module else []
        self.modes = [(m, m.training) for m in model.modules()] if is_module else []

    def __enter__(self):
        for p, _ in self.params:
            p.requires_grad_(False)
        for m, _ in self.modes:
            m.training = False
        return self

    def __exit__(self, *exc):
        for p, flag in self.params:
            p.requires_grad_(flag)
        for m, flag in self.modes:
            m.training = flag
        return False


def input_noise(shape, seeds: torch.Tensor, step: int, std: float, device, dtype) -> torch.Tensor:
    """Input noise drawn per image from (its seed, step), so it does not depend on the batch; drawn on the
    device (no host-to-device copy per step on a GPU)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    for i, s in enumerate(seeds.tolist()):
        g = torch.Generator(device=device).manual_seed(int(s) * 1_000_003 + step)
        out[i] = torch.randn(shape[1:], generator=g, dtype=dtype, device=device)
    return out.mul_(std)


def fit_pcim(
    model: Forward,
    x: torch.Tensor,
    target: torch.Tensor,
    opts: PcimOptions | None = None,
    seeds: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    prob_original: torch.Tensor | None = None,
) -> PcimResult:
    """Fit one mixing layer per image of x (B, C, H, W) for its target class (B,) against model.

    model maps (B, C, H, W) -> (B, K) logits and is left exactly as found (parameters, flags, mode).
    seeds (B,) give each image its own noise stream (only used when opts.noise > 0); default
    opts.seed + arange(B). init: first logits, the shape of the weights (`mixing.weight_shape` at
    opts.resolution), e.g. an explainer's output to refine; it replaces opts.init, and the whole fit then
    runs at opts.resolution (no coarse phase). With several budgets, each image is fitted once per budget
    in the same batch and its maps are averaged (so pixels kept even under the smallest budget rank
    highest); the probabilities reported are the means over the budgets. Returns maps of the input's size.
    prob_original (B,): p(target | x) when the caller has it (with `init`: no forward is made for it).
    """
    opts = opts or PcimOptions()
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, wd = x.shape
    target = target.to(device=x.device, dtype=torch.long).reshape(b)
    seeds = opts.seed + torch.arange(b) if seeds is None else seeds.reshape(b)
    x = x.detach()
    fine = mixing.weight_shape(x.shape, opts.per_channel, opts.resolution)
    if init is not None and tuple(init.shape) != fine:
        raise ValueError(f"init must have the weights' shape {fine}, got {tuple(init.shape)}")
    k = max(1, len(opts.budgets))
    budgets = torch.tensor(opts.budgets, dtype=x.dtype, device=x.device).repeat_interleave(b) if opts.budgets \
        else None
    plan = [(opts.resolution, opts.steps)] if init is not None else \
        schedule.phases(opts.steps, opts.resolution, opts.coarse, opts.coarse_share)
    with FrozenModel(model):
        if init is None and opts.init == "gradient":  # the same forward gives p(target | x)
            shape = mixing.weight_shape(x.shape, opts.per_channel, plan[0][0])
            del_sub = schedule.substrate_or_zero(x, opts.delete_substrate, opts.blur_sigma)
            init, prob_original = schedule.gradient_logits(model, x, target, del_sub, shape, opts.init_scale)
        elif prob_original is None:
            with torch.no_grad():
                prob_original = target_log_probs(model(x), target)[0].exp()
        w0 = None if init is None else init.detach().to(x.device, x.dtype).repeat(k, 1, 1, 1)
        growth = None
        if budgets is not None and opts.adaptive_budget is not None:
            growth = schedule.BudgetGrowth(budgets, prob_original.detach().to(x.dtype).repeat(k),
                                           opts.adaptive_budget, opts.steps)
        w, p_kept, p_deleted, loss, steps = _fit_rows(
            model, x.repeat(k, 1, 1, 1), target.repeat(k), seeds.repeat(k), budgets, opts, plan, w0, growth)
    if growth is not None:
        budgets = growth.budgets
    maps = attribution_map(w, (h, wd), budgets)
    maps = maps.view(k, b, *maps.shape[1:]).mean(0)
    if opts.map_contrast:
        maps = maps * deletion_contrast(x, opts)
    return PcimResult(
        maps=maps,
        prob_original=prob_original,
        prob_mixed=p_kept.view(k, b).mean(0),
        prob_deleted=p_deleted.view(k, b).mean(0),
        loss=loss.view(k, b).mean(0),
        steps=steps.view(k, b).amax(0),
        budget=None if budgets is None else budgets.view(k, b).mean(0),
    )


def _fit_rows(model: Forward, x: torch.Tensor, target: torch.Tensor, seeds: torch.Tensor,
              budgets: torch.Tensor | None, opts: PcimOptions, plan: list[tuple[int, int]],
              w0: torch.Tensor | None, growth: schedule.BudgetGrowth | None = None):
    """The Adam loop over rows of x, each row with its own logits, target, seed and budget; `plan` gives
    the (resolution, steps) of each phase, w0 the first logits (at the first phase's resolution). With
    `growth`, each row's budget is growth.budgets, which grows during the fit (schedule.BudgetGrowth), read
    from the deleted images each step sends anyway: no extra pass."""
    b, _, h, wd = x.shape
    if growth is not None:
        budgets = growth.budgets
    keep_sub = mixing.substrate(x, opts.keep_substrate, opts.blur_sigma)
    del_sub = mixing.substrate(x, opts.delete_substrate, opts.blur_sigma)
    if del_sub is None:
        del_sub = torch.zeros_like(x)
    dual = opts.objective == "keep-delete"

    best = torch.full((b,), float("inf"), dtype=x.dtype, device=x.device)
    since_best = torch.zeros(b, dtype=torch.long, device=x.device)
    last_loss = torch.full((b,), float("nan"), dtype=x.dtype, device=x.device)  # NaN: no step taken
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    taken = torch.zeros(b, dtype=torch.long, device=x.device)

    stacked: list[torch.Tensor] = []  # [x; x] and [keep substrate; delete substrate], made once

    def pairs(idx):
        """Images and substrates of the rows idx, stacked for one kept-then-deleted batch."""
        if idx.numel() < b:
            xa = x[idx]
            return torch.cat([xa, xa]), torch.cat([keep_sub[idx], del_sub[idx]])
        if not stacked:  # every row still fits (most steps): no gathers, no copies per step
            stacked.extend([torch.cat([x, x]), torch.cat([keep_sub, del_sub])])
        return stacked[0], stacked[1]

    def mixed(w_a, idx, step=None, with_deleted=dual):
        """The model's input for the rows idx: kept images, then deleted ones (when asked for); step
        None = no noise (final evaluation)."""
        m_low = mixing.mixing_weights(w_a, None if budgets is None else budgets[idx])
        m = mixing.upsample(m_low, (h, wd))
        noisy = opts.noise > 0 and step is not None
        if with_deleted and keep_sub is not None:
            # both halves in one pass, with the same per-pixel arithmetic as two mixing.compose calls (the
            # same noisy image in both halves)
            x2, sub2 = pairs(idx)
            if noisy:
                e = input_noise((idx.numel(), *x.shape[1:]), seeds[idx.cpu()], step, opts.noise, x.device, x.dtype)
                x2 = x2 + torch.cat([e, e])
            return m_low, mixing.compose(x2, torch.cat([m, 1 - m.clamp(max=1.0)]), sub2)
        xa = x[idx]
        if noisy:
            xa = xa + input_noise(xa.shape, seeds[idx.cpu()], step, opts.noise, x.device, x.dtype)
        kept = mixing.compose(xa, m, None if keep_sub is None else keep_sub[idx])
        if not with_deleted:
            return m_low, kept
        return m_low, torch.cat([kept, mixing.compose(xa, 1 - m.clamp(max=1.0), del_sub[idx])])

    w = None
    step = 0
    for resolution, n_steps in plan:
        shape = mixing.weight_shape(x.shape, opts.per_channel, resolution)
        if w is None:
            if w0 is not None and tuple(w0.shape) != shape:
                raise ValueError(f"init must have the weights' shape {shape}, got {tuple(w0.shape)}")
            w = torch.zeros(shape, dtype=x.dtype, device=x.device) if w0 is None else w0.clone()
        else:  # next phase: the same mixing weights on a finer grid, a fresh Adam
            w = schedule.refine_logits(w, shape)
        adam = _Adam(w, (opts.beta1, opts.beta2))
        for _ in range(n_steps):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            w_a = w[idx].clone().requires_grad_(True)
            m_low, batch = mixed(w_a, idx, step)
            logits = model(batch)
            n = idx.numel()
            loss = objective_loss(logits[:n], logits[n:] if dual else None, target[idx], opts)
            loss = loss + regularisers(w_a, m_low, opts)
            (grad,) = torch.autograd.grad(loss.sum(), w_a)
            if growth is not None and dual and growth.due(step):
                growth.update(idx, *target_log_probs(logits[n:].detach(), target[idx]))
            with torch.no_grad():
                adam.step(w, grad, idx, opts.lr * schedule.lr_factor(step, opts.steps, opts.schedule, opts.warmup))
                taken[idx] += 1
                last_loss[idx] = loss.detach()
                if opts.patience:
                    ref = best[idx]
                    improved = torch.isinf(ref) | (loss.detach() < ref - opts.tol * ref.abs().clamp(min=1e-6))
                    best[idx] = torch.where(improved, loss.detach(), best[idx])
                    since_best[idx] = torch.where(improved, 0, since_best[idx] + 1)
                    active[idx] = since_best[idx] < opts.patience
            step += 1

    with torch.no_grad():
        _, batch = mixed(w, torch.arange(b, device=x.device), with_deleted=True)
        log_p, _ = target_log_probs(model(batch), target.repeat(2))
        p = log_p.exp()
    return w, p[:b], p[b:], last_loss, taken


def deletion_contrast(x: torch.Tensor, opts: PcimOptions) -> torch.Tensor:
    """|x - deleted value| per pixel: (B, C, H, W) for per-channel maps, else summed over channels.

    Deleting a pixel moves it to the deletion substrate, so a mixing weight acts on a pixel in
    proportion to this difference; a pixel equal to its substrate is untouched whatever its weight.
    """
    sub = mixing.substrate(x, opts.delete_substrate, opts.blur_sigma)
    diff = (x if sub is None else x - sub).abs()
    return diff if opts.per_channel else diff.sum(dim=1, keepdim=True)


def attribution_map(w: torch.Tensor, size: tuple[int, int], budgets: torch.Tensor | None = None) -> torch.Tensor:
    """The map users see: alpha relative to its untouched level, upsampled to the image size.

    n * alpha is 1 for a pixel the fit never moved. Subtracting each map's median (the untouched
    level, since most pixels are not evidence) and clipping at 0 keeps pixels the fit pushed down from
    ranking above the background. Units: multiples of the uniform weight, times the budget when there
    is one, so that 1 is the level at which a pixel is kept whole.
    """
    with torch.no_grad():
        rel = mixing.pixel_softmax(w) * w[0].numel()
        med = rel.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
        rel = (rel - med).clamp(min=0)
        if budgets is not None:
            rel = rel * budgets.to(rel.dtype).view(-1, 1, 1, 1)
        return mixing.upsample(rel, size).clamp(min=0)
