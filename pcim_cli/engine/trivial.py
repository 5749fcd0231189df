"""Maps that need no model, and how much of a classifier's decision they explain (the stain check).

Two trivial baselines (`explain.method: intensity | contrast`):

- intensity: a channel's normalised intensity, the stain itself (baselines.intensity). With
  `intensity_channel` auto (None), `best_channel` picks the channel whose intensity removes the
  target class fastest under deletion (lowest mean of the fine and coarse deletion AUCs below): per
  image in `attribute`, over a whole set of images in `pcim evaluate` (one channel for the plate).
- contrast: |x - deleted value| summed over channels (pcim.deletion_contrast), PCIM's map contrast
  alone: where the field differs from what deletion puts there.

A method's map is worth something beyond the stain only where it removes the class with fewer pixels
than these, at the evidence's own scale. `stain_check` measures exactly that for one batch: the
deletion curve (pixels set to the channel mean, as in metrics.perturbation_curve) of the map and of
every trivial map (each channel's intensity and the contrast) at doubling shares of the pixels,
0.125 % to 32 % (HALVING), from which `halving_share` finds the smallest share whose deletion halves
p(target). A map that needs twice the pixels to remove the class is not as good, whatever it does
over the top 20 % (where any map covering every bright blob deletes a small evidence too).
engine/verdict.py turns the numbers of a plate into its verdict. Pure torch: tensors and a forward
callable in, tensors out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from pcim_cli.engine import baselines, metrics, verdict
from pcim_cli.engine.options import TRIVIAL, PcimOptions
from pcim_cli.engine.pcim import Forward, deletion_contrast

__all__ = ["COARSE", "FINE", "TRIVIAL", "best_channel", "candidate_maps", "deletion_aucs", "stain_check",
           "stain_check_rows"]

#: fine: the top 2 % of pixels in 0.4 % steps; coarse: the top 20 % in 4 % steps: 10 forward passes per
#: trivial map (cheap enough for `pcim explain`; `pcim evaluate` passes its own, finer grids)
FINE = torch.linspace(0.0, 0.02, 6)
COARSE = torch.linspace(0.0, 0.2, 6)
#: the stain check's grid: no deletion, then doubling shares of the pixels from 0.125 % to 32 %: 10
#: forward passes per map, a share read to within a factor of 2 at every scale of evidence (interpolated)
HALVING = torch.tensor(verdict.HALVING)


def candidate_maps(x: torch.Tensor, opts: PcimOptions,
                   channels: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Every trivial map of x (B, C, H, W): {"intensity:<channel>": (B, 1, H, W) per channel, "contrast": …}.

    Channels are named by `channels` when given, else by their index.
    """
    names = list(channels) if channels is not None else [str(c) for c in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} channel names for {x.shape[1]} channels")
    out = {f"intensity:{name}": baselines.intensity(x, c) for c, name in enumerate(names)}
    out["contrast"] = deletion_contrast(x, dataclasses.replace(opts, per_channel=False))
    return out


@torch.no_grad()
def deletion_aucs(model: Forward, x: torch.Tensor, maps: Mapping[str, torch.Tensor], target: torch.Tensor,
                  fine: torch.Tensor = FINE, coarse: torch.Tensor = COARSE,
                  chunk: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(fine, coarse) deletion AUCs (B,) of each map in `maps` (name -> (B, M, H, W)).

    Both grids start at 0; they are measured as one curve per map: the points of `fine`, then those of
    `coarse` after 0 (maps one after the other, so memory does not grow with their number).
    """
    if float(fine[0]) != 0.0 or float(coarse[0]) != 0.0:
        raise ValueError("deletion grids must start at 0")
    nf, fractions = len(fine), torch.cat([fine, coarse[1:]])
    out = {}
    for name, m in maps.items():
        c = metrics.perturbation_curve(model, x, m, target, "deletion", fractions=fractions, chunk=chunk)
        out[name] = (metrics.curve_auc(c[:, :nf], fine),
                     metrics.curve_auc(torch.cat([c[:, :1], c[:, nf:]], 1), coarse))
    return out


def best_channel(model: Forward, x: torch.Tensor, target: torch.Tensor, per_image: bool = True,
                 fine: torch.Tensor = FINE, coarse: torch.Tensor = COARSE, chunk: int = 64) -> torch.Tensor:
    """The channel whose intensity, used as the map, removes the target class fastest: the lowest mean
    of its fine and coarse deletion AUCs. (B,) indices per image, or one index (0-dim) for the batch."""
    maps = {str(c): baselines.intensity(x, c) for c in range(x.shape[1])}
    aucs = deletion_aucs(model, x, maps, target, fine, coarse, chunk)
    score = torch.stack([(aucs[n][0] + aucs[n][1]) / 2 for n in maps], 1)  # (B, C)
    if per_image:
        return score.argmin(1)
    return score.mean(0).argmin()


def halving_share(curve: torch.Tensor, fractions: torch.Tensor = HALVING, floor: torch.Tensor | float = 0.0,
                  level: float = 0.5) -> torch.Tensor:
    """(B,) verdict.halving_share of each row of `curve` (B, S): the smallest share of pixels whose
    deletion removes `level` of what deletion can remove of p(target) (inf where it never does)."""
    c = curve.detach().to("cpu", torch.float64)
    fr = [float(f) for f in fractions]
    low = torch.as_tensor(floor, dtype=torch.float64).expand(c.shape[0]).tolist()
    out = [verdict.halving_share(row, fr, lo, level) for row, lo in zip(c.tolist(), low, strict=True)]
    return torch.tensor(out, dtype=torch.float64, device=curve.device)


@torch.no_grad()
def deletion_curves(model: Forward, x: torch.Tensor, maps: Mapping[str, torch.Tensor], target: torch.Tensor,
                    fractions: torch.Tensor = HALVING, chunk: int = 64, substrate: str = "mean",
                    blur_sigma: float = 8.0) -> dict[str, torch.Tensor]:
    """(B, S) deletion curve of each map in `maps` (name -> (B, M, H, W)) at `fractions`, deleted pixels
    set to `substrate` (maps one after the other, so memory does not grow with their number)."""
    return {name: metrics.perturbation_curve(model, x, m, target, "deletion", substrate=substrate,
                                             fractions=fractions, blur_sigma=blur_sigma, chunk=chunk)
            for name, m in maps.items()}


def stain_check(model: Forward, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, opts: PcimOptions,
                channels: Sequence[str] | None = None, fractions: torch.Tensor = HALVING,
                chunk: int = 64) -> dict[str, torch.Tensor]:
    """Deletion curves (B, S) at `fractions` of the method's `maps` ("map") and of every trivial map of x,
    deleted pixels set to the fit's own deletion substrate (opts.delete_substrate: the verdict deletes as
    PCIM_Fit does; the channel median by default, the background while the evidence covers less than
    half the field, where the mean leaves flat disks the model may read as something)."""
    return deletion_curves(model, x, {"map": maps, **candidate_maps(x, opts, channels)}, target, fractions, chunk,
                           opts.delete_substrate, opts.blur_sigma)


def stain_check_rows(model: Forward, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, opts: PcimOptions,
                     channels: Sequence[str] | None, rows: Sequence[bool], chunk: int = 64) -> list[dict | None]:
    """`stain_check` of the images where `rows` is true, per image as the record keeps it:
    {"fractions": [...], "curves": {name: [p(target) at each fraction]}}; None elsewhere."""
    idx = [i for i, keep in enumerate(rows) if keep]
    out: list[dict | None] = [None] * len(rows)
    if not idx:
        return out
    found = stain_check(model, x[idx], maps[idx], target[idx], opts, channels, chunk=chunk)
    fractions = [round(float(f), 6) for f in HALVING]
    for n, i in enumerate(idx):
        out[i] = {"fractions": fractions, "curves": {name: [float(p) for p in c[n]] for name, c in found.items()}}
    return out
