"""`explain.fidelity`: the deletion / insertion AUC of every map and the stain check, at the fewest forwards.

Each point of a perturbation curve is one classifier forward of the perturbed field (metrics.py), so a
grid's points are its cost. The CSV's AUCs are over 0-100 % of the pixels ranked by the map, at the
points `FRACTIONS` (0, 1, 2, 5, 10, 20, 35, 50, 75, 100 %): benchmarks/bench_fidelity.py measured them as
close to a dense curve as the 21 evenly spaced points used before, at 9 forwards per curve instead of 20.
Points known without a forward of the map's own image are not recomputed:

- deletion at 0 and insertion at 100 % are the unperturbed image: its p(target), `prob_original`;
- deletion at 100 % (every pixel set to the channel mean) and insertion at 0 (the blurred field) do not
  depend on the map: one forward per field, whatever its number of targets (rows of a batch that hold
  the same image, e.g. one field's targets, share it).

The stain check (engine/trivial.py: the deletion curves of the map and of every map without a model at
doubling shares of the pixels) shares in the same way: the trivial maps are the field's, so their
curves are measured once per field and read for each target; their point at 0 is p(target | x). Pure
torch, tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pcim_cli.engine import metrics, mixing, trivial
from pcim_cli.engine.pcim import Forward, PcimOptions

#: the points of the CSV's deletion and insertion curves (share of the pixels)
FRACTIONS = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0])
#: what deleted pixels become, and what the insertion curve reveals pixels on (as `pcim evaluate`)
DELETE_SUBSTRATE, INSERT_SUBSTRATE, INSERT_BLUR = "mean", "blur", 8.0


def same_image_groups(x: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(first row of each run of equal consecutive rows, owner (B,): the run each row belongs to). One
    field's targets come in a row, so their images share a group."""
    b = x.shape[0]
    first = [0] + [i for i in range(1, b) if not torch.equal(x[i], x[i - 1])]
    owner = torch.zeros(b, dtype=torch.long)
    for j, start in enumerate(first):
        owner[start:] = j
    return first, owner


@torch.no_grad()
def deletion_insertion(model: Forward, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                       prob_original: torch.Tensor, fractions: torch.Tensor = FRACTIONS,
                       chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(deletion AUC, insertion AUC), each (B,), of maps (B, M, H, W) for images x (B, C, H, W) and their
    targets, over `fractions` (from 0 to 1); `prob_original` (B,): p(target | x) for these rows."""
    if float(fractions[0]) != 0.0 or float(fractions[-1]) != 1.0:
        raise ValueError("the fidelity grid must run from 0 to 1")
    b, s = x.shape[0], len(fractions)
    dev = x.device
    target = target.to(dev).long()
    first, owner = same_image_groups(x)
    owner = owner.to(dev)
    unique = x[first]
    delete = mixing.substrate(unique, DELETE_SUBSTRATE, INSERT_BLUR)
    insert = mixing.substrate(unique, INSERT_SUBSTRATE, INSERT_BLUR)
    ends = torch.softmax(model(torch.cat([delete, insert])).float(), dim=1)  # map-free points, per field
    ranks = metrics.pixel_ranks(metrics.ranking_score(maps, x.shape[1], False))
    counts = (fractions.to(dev) * ranks[0].numel()).round().long()
    middle = [(i, j) for i in range(b) for j in range(1, s - 1)]
    rows = torch.tensor([i for i, _ in middle], device=dev, dtype=torch.long)
    curves = {}
    for mode, sub in (("deletion", delete), ("insertion", insert)):
        curve = torch.empty(b, s, device=dev)
        if middle:
            probs = metrics.perturbed_probs(model, x, ranks, sub[owner], counts, middle, mode, chunk)
            curve[:, 1:-1] = probs.gather(1, target[rows][:, None])[:, 0].view(b, s - 2)
        curves[mode] = curve
    p0 = prob_original.to(dev).float()
    p_deleted = ends[: len(first)][owner].gather(1, target[:, None])[:, 0]
    p_blurred = ends[len(first) :][owner].gather(1, target[:, None])[:, 0]
    curves["deletion"][:, 0], curves["deletion"][:, -1] = p0, p_deleted
    curves["insertion"][:, 0], curves["insertion"][:, -1] = p_blurred, p0
    return metrics.curve_auc(curves["deletion"], fractions), metrics.curve_auc(curves["insertion"], fractions)


@torch.no_grad()
def stain_check_rows(model: Forward, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                     prob_original: torch.Tensor, opts: PcimOptions, channels: Sequence[str] | None,
                     rows: Sequence[bool], chunk: int = 64) -> list[dict | None]:
    """trivial.stain_check_rows of the rows where `rows` is true ({"fractions": [...], "curves": {name:
    [p(target) at each fraction]}} on trivial.HALVING; None elsewhere), with the trivial maps' curves
    measured once per field and p(target | x) not recomputed."""
    out: list[dict | None] = [None] * len(rows)
    idx = [i for i, keep in enumerate(rows) if keep]
    if not idx:
        return out
    x, maps, target = x[idx], maps[idx], target[idx].to(x.device).long()
    p0 = prob_original[idx].to(x.device).float()
    fractions = trivial.HALVING
    first, owner = same_image_groups(x)
    kind = opts.delete_substrate  # the stain check deletes as the fit does (trivial.stain_check)
    curves = {"map": _read(_deletion_probs(model, x, maps, fractions, chunk, kind, opts.blur_sigma), target)}
    unique = x[first]
    for name, m in trivial.candidate_maps(unique, opts, channels).items():  # per field, read per target
        probs = _deletion_probs(model, unique, m, fractions, chunk, kind, opts.blur_sigma)[owner.to(x.device)]
        curves[name] = _read(probs, target)
    shares = [round(float(f), 6) for f in fractions]
    for n, i in enumerate(idx):
        out[i] = {"fractions": shares,
                  "curves": {name: [float(p0[n]), *(float(v) for v in c[n, 1:])] for name, c in curves.items()}}
    return out


def _deletion_probs(model: Forward, x: torch.Tensor, maps: torch.Tensor, fractions: torch.Tensor,
                    chunk: int, substrate: str = DELETE_SUBSTRATE, blur_sigma: float = INSERT_BLUR) -> torch.Tensor:
    """Class probabilities (B, S, K) of the deletion curve's points after the first (the first is left 0)."""
    ranks = metrics.pixel_ranks(metrics.ranking_score(maps, x.shape[1], False))
    sub = mixing.substrate(x, substrate, blur_sigma)
    sub = torch.zeros_like(x) if sub is None else sub
    counts = (fractions.to(x.device) * ranks[0].numel()).round().long()
    pairs = [(i, j) for i in range(x.shape[0]) for j in range(1, len(fractions))]
    probs = metrics.perturbed_probs(model, x, ranks, sub, counts, pairs, "deletion", chunk)
    out = torch.zeros(x.shape[0], len(fractions), probs.shape[1], device=x.device)
    out[:, 1:] = probs.view(x.shape[0], len(fractions) - 1, -1)
    return out


def _read(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """p(target) (B, S) from class probabilities (B, S, K)."""
    return probs.gather(2, target.view(-1, 1, 1).expand(-1, probs.shape[1], 1))[..., 0]
