"""One entry point for every attribution method the `explain.method` key can name.

pcim-amortised (engine/explainer.py) takes the maps from a trained explainer's logits, refined by
`refine_steps` steps of the per-image fit.

`attribute(model, x, target, method, opts, seeds)` returns a `PcimResult` whatever the method, so the
worker, the store and the CSV treat PCIM and the baselines alike. A baseline's maps are non-negative,
one per channel when `opts.per_channel` (RISE and occlusion then perturb one channel at a time) and
one shared map otherwise; the fit-only statistics (mixed / deleted probability, loss) are NaN and its
step count is 0. Saliency, integrated gradients and occlusion use Captum when it is installed
(`pip install pcim-cli[baselines]`) and the pure-torch versions in `baselines.py` otherwise; both
compute the same quantity (tested). The trivial maps (`intensity`, `contrast`; engine/trivial.py)
need no model; intensity with `intensity_channel` None asks it which channel explains each image best.
Only forward calls and input gradients: any TorchScript model.

A new method: add its name to `Method` and its settings to METHOD_KEYS in engine/options.py (config,
`pcim evaluate` and the benchmarks take the list from there), and its branch to `_baseline` here.
"""

from __future__ import annotations

import dataclasses

import torch

from pcim_cli.engine import baselines, pcim, trivial
from pcim_cli.engine.explainer import amortised_pcim
from pcim_cli.engine.options import AMORTISED_KEYS, BACKENDS, BASELINE_KEYS, METHOD_KEYS, METHODS, PcimOptions
from pcim_cli.engine.pcim import Forward, FrozenModel, PcimResult, fit_pcim, target_log_probs

__all__ = ["AMORTISED_KEYS", "BACKENDS", "BASELINE_KEYS", "METHODS", "METHOD_KEYS", "attribute", "captum_available",
           "method_settings"]


def method_settings(method: str, opts: PcimOptions) -> dict:
    """The settings that change `method`'s maps: every PCIM field for pcim (as before baselines
    existed, so PCIM fingerprints do not change), those and the refine settings but not steps / lr for
    pcim-amortised, per_channel and the method's own keys otherwise."""
    values = dataclasses.asdict(opts)
    if method == "pcim":
        return {k: v for k, v in values.items() if k not in BASELINE_KEYS + AMORTISED_KEYS}
    if method == "pcim-amortised":
        return {k: v for k, v in values.items() if k not in BASELINE_KEYS + ("steps", "lr")}
    return {k: values[k] for k in ("per_channel", *METHOD_KEYS.get(method, ()))}


def captum_available() -> bool:
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        return False
    return True


def attribute(model: Forward, x: torch.Tensor, target: torch.Tensor, method: str, opts: PcimOptions,
              seeds: torch.Tensor | None = None, backend: str = "auto",
              explainer: Forward | None = None, prob_original: torch.Tensor | None = None) -> PcimResult:
    """Maps (B, M, H, W) of `method` for images x (B, C, H, W) and their target classes (B,).

    backend: auto (Captum when installed), captum, or torch (the pure-torch baselines); PCIM and RISE
    are always pure torch. explainer: the trained explainer module pcim-amortised needs. prob_original
    (B,): p(target | x) when the caller already has it (the field's prediction), for the methods that
    would make a forward only for it (all but pcim, whose gradient init gives it); None: computed.
    """
    if method == "pcim":
        return fit_pcim(model, x, target, opts, seeds=seeds)
    if method == "pcim-amortised":
        if explainer is None:
            raise ValueError("pcim-amortised needs a trained explainer (explainer=...)")
        return amortised_pcim(model, explainer, x, target, opts, seeds=seeds, prob_original=prob_original)
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    use_captum = backend == "captum" or (backend == "auto" and captum_available())
    b = x.shape[0]
    x = x.detach()
    target = target.to(device=x.device, dtype=torch.long).reshape(b)
    seeds = opts.seed + torch.arange(b) if seeds is None else seeds.reshape(b)
    with FrozenModel(model):
        if prob_original is None:
            with torch.no_grad():
                prob_original = target_log_probs(model(x), target)[0].exp()
        channel = None
        if method == "intensity" and not opts.per_channel:
            channel = (trivial.best_channel(model, x, target) if opts.intensity_channel is None
                       else torch.full((b,), opts.intensity_channel, dtype=torch.long, device=x.device))
        maps = _baseline(model, x, target, method, opts, seeds, use_captum, channel)
    nan = torch.full((b,), float("nan"), dtype=prob_original.dtype, device=x.device)
    return PcimResult(maps=maps.clamp(min=0).detach(), prob_original=prob_original, prob_mixed=nan,
                      prob_deleted=nan.clone(), loss=nan.clone(),
                      steps=torch.zeros(b, dtype=torch.long, device=x.device), channel=channel)


def _baseline(model: Forward, x: torch.Tensor, target: torch.Tensor, method: str, opts: PcimOptions,
              seeds: torch.Tensor, use_captum: bool, channel: torch.Tensor | None = None) -> torch.Tensor:
    pc = opts.per_channel
    if method == "intensity":
        return baselines.intensity(x, channel, per_channel=pc)
    if method == "contrast":
        return pcim.deletion_contrast(x, opts)
    if method == "rise":
        return baselines.rise(model, x, target, opts.rise_masks, opts.rise_cell, opts.rise_p, seeds=seeds,
                              per_channel=pc)
    if use_captum:
        return _captum(model, x, target, method, opts)
    if method == "saliency":
        return baselines.saliency(model, x, target, per_channel=pc)
    if method == "integrated-gradients":
        return baselines.integrated_gradients(model, x, target, opts.ig_steps, per_channel=pc)
    return baselines.occlusion(model, x, target, opts.occlusion_window, opts.occlusion_stride, per_channel=pc)


def _captum(model: Forward, x: torch.Tensor, target: torch.Tensor, method: str, opts: PcimOptions) -> torch.Tensor:
    """The same three baselines through Captum (same definitions as baselines.py)."""
    from captum import attr

    c = x.shape[1]
    pc = opts.per_channel
    x = x.detach().requires_grad_(method != "occlusion")  # Captum warns when it has to set the flag itself
    if method == "saliency":
        g = attr.Saliency(model).attribute(x, target=target, abs=True)
        return g if pc else g.amax(dim=1, keepdim=True)
    if method == "integrated-gradients":
        ig = attr.IntegratedGradients(model).attribute(
            x, baselines=0.0, target=target, n_steps=opts.ig_steps, method="riemann_middle",
            internal_batch_size=max(x.shape[0], 8 * x.shape[0]))
        return ig.abs() if pc else ig.sum(dim=1, keepdim=True).abs()

    def prob(z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(z), dim=1)

    win, stride = opts.occlusion_window, opts.occlusion_stride
    h, w = x.shape[-2:]
    win_h, win_w = min(win, h), min(win, w)
    fill = x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    with torch.no_grad():
        heat = attr.Occlusion(prob).attribute(
            x, target=target, baselines=fill, sliding_window_shapes=(1 if pc else c, win_h, win_w),
            strides=(1 if pc else c, stride, stride), perturbations_per_eval=max(1, 64 // x.shape[0]))
    heat = torch.nan_to_num(heat, nan=0.0)
    return heat if pc else heat.mean(dim=1, keepdim=True)
