"""Maps that need no model, and how much of a classifier's decision they explain (the stain check).

Two trivial baselines (`explain.method: intensity | contrast`):

- intensity: a channel's normalised intensity, the stain itself (baselines.intensity). With
  `intensity_channel` auto (None), `best_channel` picks the channel whose intensity removes the
  target class fastest under deletion (lowest mean of the fine and coarse deletion AUCs below): per
  image in `attribute`, over a whole set of images in `pcim evaluate` (one channel for the plate).
- contrast: |x - deleted value| summed over channels (pcim.deletion_contrast), PCIM's map contrast
  alone: where the field differs from what deletion puts there.

A method's map is worth something beyond the stain only where it deletes the class faster than these.
`stain_check` measures exactly that for one batch: the deletion AUCs of the map and of every trivial
map (each channel's intensity and the contrast) over the top 0-2 % (fine) and 0-20 % (coarse) of
pixels, set to the channel mean as in metrics.perturbation_curve. engine/verdict.py turns the numbers
of a plate into its verdict. Pure torch: tensors and a forward callable in, tensors out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from pcim_cli.engine import baselines, metrics
from pcim_cli.engine.options import TRIVIAL, PcimOptions
from pcim_cli.engine.pcim import Forward, deletion_contrast

__all__ = ["COARSE", "FINE", "TRIVIAL", "best_channel", "candidate_maps", "deletion_aucs", "stain_check",
           "stain_check_rows"]

#: fine: the top 2 % of pixels in 0.4 % steps; coarse: the top 20 % in 4 % steps: 10 forward passes per
#: trivial map (cheap enough for `pcim explain`; `pcim evaluate` passes its own, finer grids)
FINE = torch.linspace(0.0, 0.02, 6)
COARSE = torch.linspace(0.0, 0.2, 6)


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


def stain_check(model: Forward, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, opts: PcimOptions,
                channels: Sequence[str] | None = None, fine: torch.Tensor = FINE, coarse: torch.Tensor = COARSE,
                chunk: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(fine, coarse) deletion AUCs (B,) of the method's `maps` ("map") and of every trivial map of x."""
    return deletion_aucs(model, x, {"map": maps, **candidate_maps(x, opts, channels)}, target, fine, coarse, chunk)


def stain_check_rows(model: Forward, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, opts: PcimOptions,
                     channels: Sequence[str] | None, rows: Sequence[bool], chunk: int = 64) -> list[dict | None]:
    """`stain_check` of the images where `rows` is true, per image as {name: [fine, coarse]}; None elsewhere."""
    idx = [i for i, keep in enumerate(rows) if keep]
    out: list[dict | None] = [None] * len(rows)
    if not idx:
        return out
    found = stain_check(model, x[idx], maps[idx], target[idx], opts, channels, chunk=chunk)
    for n, i in enumerate(idx):
        out[i] = {name: [float(fine[n]), float(coarse[n])] for name, (fine, coarse) in found.items()}
    return out
