"""Evaluation set `density`: nuclear density in 3 classes, REAL nuclei, fields tiled for the model.

The evidence of a density class is every nucleus of the field: it covers 5-30 % of a dense or medium
field, far above pcim's 2 % budget (issue 26). Source: the real nuclei of stardist==0.9.2's
`img2d.tif` with their hand-drawn instance masks `mask2d.tif` (the same files as the `nuclei` set).

A field is a synthetic camera background (flat level, slow illumination gradient, shot and read noise,
a few bright specks of debris) onto which real nuclei are pasted at random, non-overlapping positions
until a drawn share of the field is nuclear: `sparse` (drawn 0.5-2.5 %, class < 4 %), `medium` (6-11 %,
class 4-14 %), `dense` (18-28 %, class >= 14 %). A nucleus is the real DNA image inside its
instance mask (1 px soft edge) minus the image's background level, downscaled 2x (a nucleus is then
~110 px, 6 px radius), flipped / rotated and scaled in brightness (0.8-1.25x) at random. Mask = the
pasted nuclei (the evidence of `medium` and `dense`: deleting them makes the field sparse; `sparse` has
no local evidence: it rests on nuclei that are missing). `x_null` = the same field without its
nuclei (a `sparse` field), `labels` = the pasted nuclei as instance labels.

Split: training tiles use only nuclei whose centre lies at x < SPLIT_X of the source image, evaluation
fields only the others (27 real nuclei, never seen in training), each field with fresh positions.

The model: a BatchNorm ResNet with global average pooling (SmallResNet, 1 channel, 3 classes) trained
on 64 px tiles labelled by their own nuclear share; evaluation fields are 160 px, so pcim cuts every
field into 3 x 3 tiles of 64 px (8 px overlap) for `model.input_size: [64, 64]`. The network is fully
convolutional, so it also runs on the whole field (`model.aggregate: whole-field`): a density is
scale-free, so it transfers. Normalisation: fixed, (raw - NORM[0]) / (NORM[1] - NORM[0]) clipped to
[0, 1] (a per-field percentile stretch would make a sparse field's background as bright as a dense
field's nuclei).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _common as C
from .nuclei import _dihedral_np, _label_boxes, stardist_data

CLASSES = ("sparse", "medium", "dense")
CHANNELS = ("DNA",)
TILE = 64
FIELD = 160  # 3 x 3 tiles of 64 px with 8 px overlap (2.5x the model's input)
SPLIT_X = 352  # nuclei centred at x < 352 of the source image: training; the others: evaluation
BOUNDS = (0.04, 0.14)  # nuclear share: sparse < 0.04 <= medium < 0.14 <= dense
DRAW = {0: (0.005, 0.025), 1: (0.06, 0.11), 2: (0.18, 0.28)}
NORM = (10.0, 170.0)  # raw camera units -> [0, 1]
SCALE = 2  # source nuclei are downscaled by this factor
RECIPE = {"n_train": 3000, "epochs": 8, "lr": 3e-3, "weight_decay": 1e-4}
TRAIN_SEED, TEST_SEED, EVAL_SEED = 30, 31, 32


def _downscale(a: np.ndarray, k: int) -> np.ndarray:
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def nucleus_library() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{'train': [...], 'eval': [...]}: (intensity patch float64, mask bool) of every whole real nucleus,
    background-subtracted, soft-edged and downscaled SCALE x."""
    dm = C.demo_module()
    img, lab = stardist_data()
    bg = float(np.median(img[lab == 0]))
    out: dict[str, list] = {"train": [], "eval": []}
    for k, (y0, y1, x0, x1) in sorted(_label_boxes(lab).items()):
        m = 2 * SCALE
        ya, yb, xa, xb = max(0, y0 - m), min(img.shape[0], y1 + m), max(0, x0 - m), min(img.shape[1], x1 + m)
        reg = lab[ya:yb, xa:xb] == k
        soft = np.clip(dm.gaussian_blur(dm._dilate(reg, 1).astype(np.float64), 0.7), 0, 1)
        patch = np.clip(img[ya:yb, xa:xb] - bg, 0, None) * soft
        small, small_mask = _downscale(patch, SCALE), _downscale(reg.astype(np.float64), SCALE) >= 0.5
        split = "train" if (x0 + x1) / 2 < SPLIT_X else "eval"
        out[split].append((small, small_mask))
    return out


def label_of(share: float) -> int:
    return int(share >= BOUNDS[0]) + int(share >= BOUNDS[1])


def make_field(rng, library, size: int, cls: int):
    """One field of class `cls`, or None when the drawn share ends in another class.

    Returns (x float32 (1, size, size), mask bool, x_null float32, labels int32, share)."""
    dm = C.demo_module()
    want = rng.uniform(*DRAW[cls])
    signal = np.zeros((size, size))
    labels = np.zeros((size, size), dtype=np.int32)
    occupied = np.zeros((size, size), dtype=bool)
    n = 0
    tries = 0
    while (labels > 0).mean() < want and tries < 5000:
        tries += 1
        patch, pmask = library[int(rng.integers(len(library)))]
        op = int(rng.integers(0, 8))
        patch, pmask = _dihedral_np(patch, op), _dihedral_np(pmask, op)
        ph, pw = patch.shape
        if ph > size or pw > size:
            continue
        y0, x0 = int(rng.integers(-ph // 3, size - 2 * ph // 3)), int(rng.integers(-pw // 3, size - 2 * pw // 3))
        ys, xs = slice(max(0, y0), min(size, y0 + ph)), slice(max(0, x0), min(size, x0 + pw))
        py, px = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        cut_mask = pmask[py, px]
        if cut_mask.sum() < 0.6 * pmask.sum() or (occupied[ys, xs] & cut_mask).any():
            continue
        n += 1
        signal[ys, xs] += rng.uniform(0.8, 1.25) * patch[py, px]
        labels[ys, xs][cut_mask] = n
        occupied[ys, xs] |= dm._dilate(cut_mask, 1)
    share = float((labels > 0).mean())
    if label_of(share) != cls:
        return None
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    level = rng.uniform(14, 26)
    slope = rng.uniform(-4, 4, 2) / size
    background = level + slope[0] * (yy - size / 2) + slope[1] * (xx - size / 2)
    background += 1.5 * dm._smooth_noise(rng, (size, size), 12.0)
    n_sp = int(rng.poisson(1.5 * (size / 128.0) ** 2))
    specks = np.zeros((size, size))
    if n_sp:
        pts = list(zip(rng.uniform(0, size, n_sp), rng.uniform(0, size, n_sp), strict=True))
        specks = dm._spots(yy, xx, pts, rng.uniform(0.5, 0.9, n_sp), rng.uniform(40, 120, n_sp))
    z1, z2 = rng.standard_normal((2, size, size))

    def camera(s):  # shot noise (Gaussian approximation, shared draw) + read noise, fixed normalisation
        lam = dm.gaussian_blur(s, 0.5) + background
        raw = np.clip(lam + np.sqrt(np.clip(lam, 0, None)) * z1 + 2.0 * z2, 0, None)
        return np.clip((raw - NORM[0]) / (NORM[1] - NORM[0]), 0, 1)[None].astype(np.float32)

    return camera(signal + specks), labels > 0, camera(specks), labels, share


def make_set(n: int, seed: int, size: int, split: str, classes=(0, 1, 2)):
    """n fields of `size` px, classes cycling through `classes`; nuclei from the `split` library.

    Returns x float32 (n, 1, size, size), y long (n,), mask bool (n, size, size), x_null, labels int32,
    share float (n,)."""
    library = nucleus_library()[split]
    rng = np.random.default_rng([seed, size])
    xs, ys, ms, ns, ls, shares = [], [], [], [], [], []
    for i in range(n):
        cls = classes[i % len(classes)]
        for _ in range(1000):
            out = make_field(rng, library, size, cls)
            if out is not None:
                break
        else:
            raise RuntimeError(f"no {size} px field of class {CLASSES[cls]} after 1000 draws")
        x, m, xn, lab, share = out
        xs.append(x)
        ms.append(m)
        ns.append(xn)
        ls.append(lab)
        ys.append(cls)
        shares.append(share)
    return (torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long), torch.from_numpy(np.stack(ms)),
            torch.from_numpy(np.stack(ns)), torch.from_numpy(np.stack(ls)), torch.tensor(shares))


def _model():
    def build():
        from .ihc import field_accuracy

        r = RECIPE
        with C.deterministic_torch(0):
            train = make_set(r["n_train"], TRAIN_SEED, TILE, "train")[:2]
            test = make_set(600, TEST_SEED, TILE, "eval")[:2]
            net = C.ARCHS["resnet"](in_channels=1, n_classes=3)
            info = C.fit(net, train, test, epochs=r["epochs"], lr=r["lr"], weight_decay=r["weight_decay"],
                         seed=0, label="density-resnet")
            x, y, _, xn, _, _ = make_set(90, TEST_SEED + 100, FIELD, "eval")
            info.update(field_accuracy(net, x, y))
            info["n_test_fields"] = len(x)
            pos = y > 0
            with torch.no_grad():
                p = net(x[pos]).softmax(1).gather(1, y[pos, None])[:, 0]
                pn = net(xn[pos]).softmax(1).gather(1, y[pos, None])[:, 0]
            info["evidence_p_target_whole_field"] = float(p.mean())
            info["evidence_p_target_without_evidence_whole_field"] = float(pn.mean())
            ts = C.export(net, 1)
        info.update(arch="resnet", task="density", recipe=r, tile=TILE, field=FIELD)
        return ts, info

    return C.cached_model(f"density_resnet_{C.VERSION}", build)


def density(n: int = 32, seed: int = EVAL_SEED, classes: tuple[int, ...] = (1, 2), whole: bool = False) -> dict:
    """n held-out 160 px fields (alternately medium and dense by default; `classes` cycles), their nuclei
    masks, and the 3-class ResNet trained on 64 px tiles. `tile` says the model's input size (pcim tiles
    the fields); whole=True leaves `tile` out: the model runs on the whole field."""
    model, info = _model()
    x, y, mask, x_null, labels, share = make_set(n, seed, FIELD, "eval", classes)
    out = {
        "name": "density-resnet-160" + ("-whole" if whole else ""),
        "x": x,
        "mask": mask,
        "target": y,
        "y": y,
        "evidence_classes": [1, 2],
        "model": model,
        "x_null": x_null,
        "labels": labels,
        "classes": list(CLASSES),
        "channels": list(CHANNELS),
        "share": share,
        "info": info,
    }
    if not whole:
        out["tile"] = (TILE, TILE)
    return out
