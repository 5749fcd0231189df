"""`pcim evaluate` with plate.objects: do a method's maps pick out the objects that carry the evidence?

An object is *positive* when at least half of its pixels lie in the field's evidence mask. Per field
with both positive and other objects, the AUROC of an object score for positive vs other objects
(Mann-Whitney, ties count half), averaged over those fields:

- `object_auroc_share`: the object's share of the method's map (the object table's `_Share`);
- `object_auroc_deltap`: the drop of p(target) when the object alone is deleted (`_DeltaP`). It does
  not depend on the map: the same for every method, a property of the model and the objects;
- `object_top_drop`: the drop of p(target) when the method's top-k objects (by share) are deleted
  together (the main CSV's `PCIM_<Object>_TopDeltaP`): higher = the map's top objects matter more.
"""

from __future__ import annotations

import math

import torch

from pcim_cli.engine import metrics, mixing
from pcim_cli.engine import objects as engine
from pcim_cli.engine.pcim import Forward, PcimOptions

COLUMNS = {"object_auroc_share": "obj. AUROC share", "object_auroc_deltap": "obj. AUROC ΔP",
           "object_top_drop": "top-k ΔP"}
MIN_OVERLAP = 0.5  # share of an object's pixels inside the mask that makes it positive


def positives(labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N,), positive (N,) bool): the objects, and which of them lie mostly inside the mask."""
    ids, index = engine.compact(labels)
    n = ids.numel()
    area = torch.zeros(n + 1).index_add_(0, index, torch.ones(index.numel()))
    inside = torch.zeros(n + 1).index_add_(0, index, mask.reshape(-1).float())
    return ids, (inside[1:] >= MIN_OVERLAP * area[1:].clamp(min=1))


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """AUROC of `score` for positive vs other objects; NaN without both kinds."""
    if not bool(positive.any()) or bool(positive.all()):
        return float("nan")
    return float(metrics.pixel_auroc(score.double().view(1, 1, -1), positive.view(1, 1, -1))[0])


class ObjectScorer:
    """Scores maps of several methods on the same fields; the per-object deletion runs once per field."""

    def __init__(self, model: Forward, x: torch.Tensor, target: torch.Tensor, labels: list[torch.Tensor | None],
                 masks: list[torch.Tensor | None], opts: PcimOptions, top_k: int = 3, batch_size: int = 16):
        self.model, self.x, self.target, self.opts = model, x, target, opts
        self.labels, self.masks, self.top_k, self.batch = labels, masks, top_k, batch_size
        self._delta: dict[int, torch.Tensor] = {}

    def _deleted(self, i: int) -> torch.Tensor:
        sub = mixing.substrate(self.x[i : i + 1], self.opts.delete_substrate, self.opts.blur_sigma)
        return torch.zeros_like(self.x[i]) if sub is None else sub[0]

    def _drops(self, i: int, deletions: list[torch.Tensor]) -> torch.Tensor:
        base, after = engine.deletion_probs(self.model, self.x[i].cpu(), self.labels[i].long(), deletions,
                                            self._deleted(i).cpu(), batch_size=self.batch, device=self.x.device)
        t = int(self.target[i])
        return base[t] - after[:, t]

    def delta_p(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        if i not in self._delta:
            self._delta[i] = self._drops(i, [ids[j : j + 1] for j in range(ids.numel())])
        return self._delta[i]

    def scores(self, maps: torch.Tensor) -> dict[str, list[float]]:
        """Per field, the three object scores of these maps (B, M, H, W) (NaN where not defined)."""
        out: dict[str, list[float]] = {k: [] for k in COLUMNS}
        for i in range(len(self.x)):
            labels, mask = self.labels[i], self.masks[i]
            if labels is None or mask is None:
                for k in COLUMNS:
                    out[k].append(math.nan)
                continue
            per_channel = engine.channel_attribution(maps[i : i + 1].cpu().float(), self.x[i].cpu(),
                                                     self._deleted(i).cpu())
            measured = engine.measure(per_channel, labels.long())
            ids, pos = positives(labels, mask)
            out["object_auroc_share"].append(auroc(measured.share[0], pos))
            out["object_auroc_deltap"].append(auroc(self.delta_p(i, ids), pos) if ids.numel() else math.nan)
            top = engine.top_objects(measured.sum, measured.ids, self.top_k)[0]
            useful = top.numel() and bool(pos.any())  # a field without positive objects has nothing to find
            out["object_top_drop"].append(float(self._drops(i, [top])[0]) if useful else math.nan)
        return out
