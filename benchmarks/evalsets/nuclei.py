"""Evaluation set `nuclei`: a semi-synthetic mitotic-marker task on REAL nuclei.

Source: stardist==0.9.2's wheel ships `stardist/data/images/img2d.tif` (512x512 uint16 fluorescence
nuclei, 2018 Data Science Bowl / BBBC038, data CC0) and `mask2d.tif` (hand-drawn instance masks,
125 nuclei). Fetched once with `pip download` into benchmarks/.cache/evalsets/ (never committed);
raises DataUnavailableError when the package index cannot be reached.

Two channels per crop:
  0  the real DNA image;
  1  a PH3-like marker: dim background + shot/read noise everywhere. Positive crops: 1-2 randomly chosen
     real nuclei (their true instance masks; whole nuclei >= 150 px not cut by the image border) carry a
     bright marker whose texture follows the real DNA intensity inside the mask (DNA^1.5 times
     DNA-weighted condensed-chromatin granules).
Distractors, in both classes: faint uniform staining of all nuclei; BRIGHT but flat (untextured) staining
of 1-2 unmarked nuclei; a bright out-of-focus haze; sharp bright specks. Every crop of either class has a
bright flat nucleus or a haze, so after per-crop percentile normalisation the background looks alike in
both classes: the class is only readable from the marked nuclei's appearance (checked: removing the
evidence, `x_null`, flips the prediction; see info["evidence_*"]).
Evidence mask = the marked nuclei's instance masks. Target = 1 ("mitotic").

Split: training crops lie in the left 3/4 of the image (x < 384); evaluation crops end at the right
edge. For size 128 an evaluation crop lies inside the right quarter (no pixel seen in training). For
size > 128 the crop also covers part of the training area (context overlaps), but the marked nuclei are
always chosen among the 19 markable nuclei lying entirely in the right quarter, so the evidence is never
a nucleus marked in training. Crops are flipped / rotated by 90 degrees at random.

Models (trained on first use, cached): "maxpool" (MaxPoolNet, trained on 128 and some 256 px crops,
exported without BatchNorm) works at 128 and 256 px; "resnet" (SmallResNet, BatchNorm, global average
pooling, trained on 128 px crops) is accurate at 128 px but, as any average-pooling classifier whose
evidence is 1-2 nuclei, loses accuracy on larger fields (evidence diluted 4x at 256 px): see
info["test_accuracy_256"].
"""

from __future__ import annotations

import numpy as np
import tifffile
import torch

from . import _common as C

PACKAGE = "stardist==0.9.2"
FILES = {  # name -> (path inside the wheel, sha256)
    "img2d.tif": ("stardist/data/images/img2d.tif", "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "mask2d.tif": (
        "stardist/data/images/mask2d.tif",
        "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    ),
}
SPLIT_X = 384  # training: x < 384; held-out evidence: x >= 384
# training recipes; mix = [(number of crops, crop size)]. Sized for < 3 minutes on one CPU thread.
RECIPES = {
    "maxpool": {"mix": [(1200, 128), (150, 256)], "epochs": 7, "lr": 3e-3, "weight_decay": 0.0},
    "resnet": {"mix": [(2000, 128)], "epochs": 8, "lr": 3e-3, "weight_decay": 1e-4},
}
TRAIN_SEED, TEST_SEED, EVAL_SEED = 10, 11, 12

DataUnavailableError = C.DataUnavailableError


def stardist_data() -> tuple[np.ndarray, np.ndarray]:
    """(image float64 (512, 512), instance labels int32 (512, 512)), cached after the first call."""
    paths = C.wheel_files(PACKAGE, FILES, "stardist-0.9.2", "nuclei")
    img = tifffile.imread(paths["img2d.tif"]).astype(np.float64)
    lab = tifffile.imread(paths["mask2d.tif"]).astype(np.int32)
    return img, lab


MIN_MARKED_AREA = 150  # px; smaller labels are fragments


def _label_boxes(lab: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """label -> (y0, y1, x0, x1), half-open, for the labels that may be marked: whole nuclei of at least
    MIN_MARKED_AREA px that do not touch the image border (those are cut off)."""
    out = {}
    H, W = lab.shape
    for k in np.unique(lab):
        if k == 0:
            continue
        ys, xs = np.nonzero(lab == k)
        box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        if len(ys) >= MIN_MARKED_AREA and box[0] > 0 and box[2] > 0 and box[1] < H and box[3] < W:
            out[int(k)] = box
    return out


def _eligible(boxes, y0, x0, size, xmin, xmax):
    """Markable labels lying entirely inside the crop and entirely inside [xmin, xmax) horizontally."""
    return [
        k
        for k, (a, b, c, d) in boxes.items()
        if a >= y0 and b <= y0 + size and c >= max(x0, xmin) and d <= min(x0 + size, xmax)
    ]


def make_crop(rng, img, lab, boxes, y0, x0, size, positive, xmin=0, xmax=512, marked=None):
    """One 2-channel crop, its evidence mask, and the same crop with the evidence removed.

    Returns (crop float64 (2, size, size), mask bool (size, size), crop_null float64 (2, size, size)).
    crop_null has the same DNA, distractors and noise draw, only without the marked nuclei's marker.
    Both classes carry the same kinds of bright distractors, so that after per-crop percentile
    normalisation the background looks alike in both classes (no global-statistics shortcut).
    """
    dm = C.demo_module()
    dna = img[y0 : y0 + size, x0 : x0 + size]
    L = lab[y0 : y0 + size, x0 : x0 + size]
    ids = [int(i) for i in np.unique(L) if i != 0]
    evidence = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    if positive:
        if marked is None:
            cand = _eligible(boxes, y0, x0, size, xmin, xmax)
            k = min(len(cand), int(rng.integers(1, 3)))
            marked = rng.choice(cand, size=k, replace=False).tolist()
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        for k in marked:
            reg = L == k
            rel = np.clip(dna / max(np.percentile(dna[reg], 99), 1.0), 0, 1.2)
            # condensed-chromatin granules: bright puncta at DNA-weighted random positions in the nucleus
            py, px = np.nonzero(reg)
            w = dna[py, px] ** 2
            n_g = max(4, int(reg.sum() / 25))
            pick = rng.choice(len(py), size=n_g, replace=True, p=w / w.sum())
            centers = list(zip(py[pick], px[pick], strict=True))
            gr = dm._spots(yy, xx, centers, rng.uniform(0.8, 1.3, n_g), rng.uniform(0.5, 1.0, n_g))
            gr /= gr[reg].max() + 1e-9
            amp = rng.uniform(180, 320)  # granule peaks a bit above the flat decoys (100-220)
            evidence += np.where(reg, amp * rel**1.5 * (0.35 + 0.65 * gr), 0.0)
            mask |= reg
    others = [i for i in ids if not (positive and i in marked)]
    lut = np.zeros(int(L.max()) + 1)
    decoy = np.zeros((size, size))
    # faint uniform staining of every (unmarked) nucleus
    if rng.random() < 0.5:
        lut[others] += rng.uniform(10, 40) * rng.uniform(0.8, 1.2, len(others))
    # bright but FLAT (untextured, not following DNA) staining of 1-2 unmarked nuclei, and/or a bright
    # haze: every crop of either class gets at least one, so the background looks alike in both classes
    # after normalisation, and x_null (a positive without its evidence) is an ordinary negative.
    use_flat, use_haze = rng.random() < 0.7, rng.random() < 0.45
    if not (use_flat or use_haze):
        use_flat = True
    if use_flat and others:
        pick = rng.choice(others, size=min(len(others), int(rng.integers(1, 3))), replace=False)
        lut[pick] = rng.uniform(100, 220, len(pick))
    decoy += lut[L] * (1.0 + 0.06 * dm._smooth_noise(rng, (size, size), 4.0))
    if use_haze:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        decoy += dm._spots(
            yy, xx, [(rng.uniform(0, size), rng.uniform(0, size))], [rng.uniform(5, 10)], [rng.uniform(100, 250)]
        )
    # sharp bright specks (debris)
    n_sp = int(rng.poisson(2.0 * (size / 128.0) ** 2))
    if n_sp:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        pts = list(zip(rng.uniform(0, size, n_sp), rng.uniform(0, size, n_sp), strict=True))
        decoy += dm._spots(yy, xx, pts, rng.uniform(0.5, 0.9, n_sp), rng.uniform(80, 300, n_sp))
    bg = rng.uniform(8, 16)
    z1, z2 = rng.standard_normal((2, size, size))

    def camera(signal):  # shot noise (Gaussian approximation, shared draw) + read noise
        lam = dm.gaussian_blur(signal, 0.5) + bg
        return np.clip(lam + np.sqrt(np.clip(lam, 0, None)) * z1 + 2.0 * z2, 0, None)

    crop = np.stack([dna, camera(evidence + decoy)])
    null = np.stack([dna, camera(decoy)]) if positive else crop
    return crop, mask, null


def _dihedral_np(a: np.ndarray, op: int) -> np.ndarray:
    if op >= 4:
        a = a[..., ::-1]
    return np.ascontiguousarray(np.rot90(a, op % 4, axes=(-2, -1)))


def make_set(n, seed, size, split, positive_only=False, augment=True):
    """n normalised crops: split 'train' (left 3/4) or 'eval' (ending at the right edge).

    Returns x float32 (n, 2, size, size), y long (n,), mask bool (n, size, size), x_null float32 (the
    same crops without the evidence, each normalised on its own), labels int32 (n, size, size) (the
    hand-drawn nuclei of the crop, stardist's mask2d). Classes alternate (or all positive).
    """
    dm = C.demo_module()
    img, lab = stardist_data()
    boxes = _label_boxes(lab)
    H, W = img.shape
    if size > H:
        raise ValueError(f"size must be <= {H}, got {size}")
    rng = np.random.default_rng([seed, size])
    xs, ys, ms, ns, ls = [], [], [], [], []
    for i in range(n):
        pos = True if positive_only else (i % 2 == 1)
        while True:
            y0 = int(rng.integers(0, H - size + 1))
            if split == "train":
                if size > SPLIT_X:
                    raise ValueError(f"training crops must fit in x < {SPLIT_X}")
                x0, xmin, xmax = int(rng.integers(0, SPLIT_X - size + 1)), 0, SPLIT_X
            else:
                x0, xmin, xmax = W - size, SPLIT_X, W
            if not pos or _eligible(boxes, y0, x0, size, xmin, xmax):
                break
        crop, m, null = make_crop(rng, img, lab, boxes, y0, x0, size, pos, xmin, xmax)
        lab_crop = lab[y0 : y0 + size, x0 : x0 + size]
        if augment:
            op = int(rng.integers(0, 8))
            crop, m, null = _dihedral_np(crop, op), _dihedral_np(m, op), _dihedral_np(null, op)
            lab_crop = _dihedral_np(lab_crop, op)
        xs.append(dm.percentile_normalize(crop))
        ns.append(dm.percentile_normalize(null))
        ys.append(int(pos))
        ms.append(m)
        ls.append(lab_crop)
    return (
        torch.from_numpy(np.stack(xs)),
        torch.tensor(ys, dtype=torch.long),
        torch.from_numpy(np.stack(ms)),
        torch.from_numpy(np.stack(ns)),
        torch.from_numpy(np.stack(ls)),
    )


def _model(arch: str):
    def build():
        r = RECIPES[arch]
        with C.deterministic_torch(0):
            train = [make_set(n, TRAIN_SEED + k, sz, "train")[:2] for k, (n, sz) in enumerate(r["mix"])]
            test = {sz: make_set(400 if sz == 128 else 100, TEST_SEED, sz, "eval")[:2] for sz in (128, 256)}
            net = C.make_net(arch, 2)
            info = C.fit(
                net,
                train,
                test,
                epochs=r["epochs"],
                lr=r["lr"],
                weight_decay=r["weight_decay"],
                seed=0,
                label=f"nuclei-{arch}",
            )
            for sz in (128, 256):
                x, y, _, xn, _ = make_set(100, TEST_SEED + 100, sz, "eval", positive_only=True)
                for k, v in C.evidence_check(net, x, xn, y).items():
                    info[f"evidence_{k}_{sz}"] = v
            ts = C.export(net, 2)
        info.update(arch=arch, task="nuclei", recipe=r)
        return ts, info

    return C.cached_model(f"nuclei_{arch}_{C.VERSION}", build)


def nuclei(n: int = 32, size: int = 128, arch: str = "maxpool", seed: int = EVAL_SEED,
           classes: tuple[int, ...] = (1,)) -> dict:
    """n held-out crops of `size` px (positive; classes=(0, 1): negative and mitotic alternately), the
    evidence masks (empty for negatives), and a model trained at 128 px."""
    if arch not in C.ARCHS:
        raise ValueError(f"arch must be one of {sorted(C.ARCHS)}, got {arch!r}")
    if tuple(classes) not in ((1,), (0, 1)):
        raise ValueError(f"classes must be (1,) or (0, 1), got {classes}")
    model, info = _model(arch)
    x, y, mask, x_null, labels = make_set(n, seed, size, "eval", positive_only=tuple(classes) == (1,))
    return {
        "name": f"nuclei-{arch}-{size}",
        "x": x,
        "mask": mask,
        "target": y,
        "y": y,
        "evidence_classes": [1],
        "model": model,
        "x_null": x_null,
        "labels": labels,
        "classes": ["negative", "mitotic"],
        "channels": ["DNA", "marker"],
        "info": info,
    }
