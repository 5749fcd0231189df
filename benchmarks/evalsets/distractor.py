"""Evaluation set `distractor`: the marker stain also lights decoys that the classifier learned to ignore.

The demo generator's fields (DNA, PH3, Actin; `mitotic` = 1-2 PH3-positive mitotic nuclei) with, in
BOTH classes, DECOYS: autofluorescent debris outside the nuclei that lights every channel, as bright
in each as a mitotic cell, but smooth: without the mitotic cell's granular chromatin and its Actin
ring. Together they cover one to two times the evidence's area. A classifier trained on such fields
must tell a mitotic nucleus from a decoy by its texture and shape, so the marker's intensity and the
contrast |x - mean| rank the decoys with the evidence: over the top 0-20 % of pixels any map that
covers every bright blob deletes the evidence too, and a comparison at that scale calls the stain
nearly as good as a map of the evidence (issue 26, 3b). The true evidence (`mask`) is the mitotic
nuclei (dilated 1 px, as in `demo`); `decoys` marks the decoys.

Images: `make_demo.make_field` (same nuclei, distractors of the demo, optics and camera), then the
decoys' photons (Poisson) added to every channel of the raw uint16 field and of its evidence-free twin
alike (`x_null`: the mitotic cells' signal removed, decoys kept), then the percentile normalisation
pcim uses. Deterministic (seeded numpy; the model on one torch thread).

Model: MaxPoolNet (3 channels, BatchNorm folded, global max pooling) trained on 2000 fields of
both classes (classes alternate), 400 held-out test fields; cached like the other sets.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _common as C

TRAIN_SEED, TEST_SEED, EVAL_SEED = 30, 31, 32
RECIPE = {"n_train": 2000, "epochs": 8, "lr": 3e-3, "weight_decay": 0.0}
DECOYS = (2, 4)  # decoys per 128 x 128 field (uniform, inclusive)
DECOY_RADIUS = (3.0, 5.0)  # px
#: photons at a decoy's centre, per channel (DNA, PH3, Actin): as bright in PH3 as mitotic clumps
#: (2500-6000), as bright in DNA as condensed mitotic chromatin (1700-2600 x 0.45-1.35), and in Actin as
#: a rounded mitotic cell (700-1100, ring 500)
DECOY_PHOTONS = ((1500.0, 2600.0), (3000.0, 6000.0), (700.0, 1400.0))
BLUR = (0.7, 0.6, 1.2)  # the demo's optics per channel


def _decoys(rng: np.random.Generator, labels: np.ndarray, size: int,
            count: tuple[int, int] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Photon images of the decoys per channel and their mask, placed away from every nucleus; `count`:
    decoys per field (uniform, inclusive), default DECOYS per 128 x 128 px."""
    dm = C.demo_module()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    area = (size * size) / (128.0 * 128.0)
    k = (int(round(rng.integers(DECOYS[0], DECOYS[1] + 1) * area)) if count is None
         else int(rng.integers(count[0], count[1] + 1)))
    taken = dm._dilate(labels > 0, 3)
    channels = [np.zeros((size, size)) for _ in DECOY_PHOTONS]
    mask = np.zeros((size, size), dtype=bool)
    placed, tries = 0, 0
    while placed < k and tries < 200:
        tries += 1
        r = rng.uniform(*DECOY_RADIUS)
        cy, cx = rng.uniform(r + 2, size - r - 2, 2)
        rr = dm._ellipse_r(yy, xx, cy, cx, r, r * rng.uniform(0.75, 1.0), rng.uniform(0, math.pi))
        if ((rr <= 1.3) & (taken | mask)).any():
            continue
        body = dm._soft(rr, r, 0.8)  # smooth: no clumps, no ring
        for c, (lo, hi) in enumerate(DECOY_PHOTONS):
            channels[c] += rng.uniform(lo, hi) * body
        mask |= rr <= 1.0
        placed += 1
    return [dm.gaussian_blur(ch, s) for ch, s in zip(channels, BLUR, strict=True)], dm._dilate(mask, 1)


def make_field(rng: np.random.Generator, positive: bool, size: int = 128, decoys: tuple[int, int] | None = None):
    """(x, mask, x_null, decoys, labels): normalised float32 (3, H, W) fields with and without the
    evidence (both with the decoys), the evidence mask, the decoy mask, the nuclei labels."""
    dm = C.demo_module()
    img, mask, null, labels = dm.make_field(rng, positive, size, return_null=True, return_labels=True)
    photons, decoy_mask = _decoys(rng, labels, size, decoys)
    extra = [rng.poisson(ch) for ch in photons]
    out = []
    for raw in (img, null):
        raw = raw.astype(np.float64) + np.stack(extra)
        out.append(dm.percentile_normalize(np.clip(raw, 0, 65535)))
    return out[0], mask, out[1], decoy_mask, labels.astype(np.int32)


def make_set(n: int, seed: int, size: int = 128, positive_only: bool = False, classes: tuple[int, ...] | None = None,
             decoys: tuple[int, int] | None = None):
    """n fields: x (n, 3, H, W), y (n,), mask, x_null, decoys, labels; classes alternate (0, 1) unless
    positive_only, or cycle through `classes`."""
    rng = np.random.default_rng([seed, size])
    cycle = (1,) if positive_only else (classes or (0, 1))
    xs, ys, ms, ns, ds, ls = [], [], [], [], [], []
    for i in range(n):
        pos = bool(cycle[i % len(cycle)])
        x, m, null, d, lab = make_field(rng, pos, size, decoys)
        xs.append(x)
        ys.append(int(pos))
        ms.append(m)
        ns.append(null)
        ds.append(d)
        ls.append(lab)
    t = torch.from_numpy
    return (t(np.stack(xs)), torch.tensor(ys, dtype=torch.long), t(np.stack(ms)), t(np.stack(ns)),
            t(np.stack(ds)), t(np.stack(ls)))


def _model():
    def build():
        with C.deterministic_torch(0):
            xtr, ytr = make_set(RECIPE["n_train"], TRAIN_SEED)[:2]
            xte, yte = make_set(400, TEST_SEED)[:2]
            net = C.make_net("maxpool", 3)
            info = C.fit(net, (xtr, ytr), (xte, yte), epochs=RECIPE["epochs"], lr=RECIPE["lr"],
                         weight_decay=RECIPE["weight_decay"], seed=0, label="distractor")
            x, y, _, xn, _, _ = make_set(100, TEST_SEED + 100, positive_only=True)
            info.update({f"evidence_{k}": v for k, v in C.evidence_check(net, x, xn, y).items()})
            ts = C.export(net, 3)
        info.update(arch="maxpool", task="distractor", recipe=RECIPE)
        return ts, info

    return C.cached_model(f"distractor_maxpool_{C.VERSION}", build)


def distractor(n: int = 32, seed: int = EVAL_SEED, size: int = 128, classes: tuple[int, ...] = (1,),
               decoys: tuple[int, int] | None = None) -> dict:
    """n fields with decoys (positive by default; `classes` cycles, e.g. (0, 1): negative and mitotic fields
    alternately), their evidence and decoy masks, and the classifier trained on them (at 128 px).
    `decoys`: decoys per field (default 2-4 per 128 x 128 px, as in training); e.g. size=256 with
    decoys=(3, 5): the evidence is 0.2-0.4 % of a field, the decoys about twice that."""
    if not classes or not set(classes) <= {0, 1}:
        raise ValueError(f"classes must be drawn from (0, 1), got {classes}")
    dm = C.demo_module()
    model, info = _model()
    x, y, mask, x_null, decoy_mask, labels = make_set(n, seed, size, classes=tuple(classes), decoys=decoys)
    return {
        "name": "distractor-maxpool" + ("" if size == 128 else f"-{size}"),
        "x": x,
        "mask": mask,
        "decoys": decoy_mask,
        "target": y,
        "y": y,
        "evidence_classes": [1],
        "model": model,
        "x_null": x_null,
        "labels": labels,
        "classes": list(dm.CLASSES),
        "channels": list(dm.CHANNELS),
        "info": info,
    }
