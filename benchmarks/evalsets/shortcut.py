"""Evaluation set `shortcut`: classifiers that call a class for the wrong reason, and one that does not.

The demo generator's fields (DNA, PH3, Actin; `mitotic` = 1-2 PH3-positive nuclei) get one of four
imaging artefacts, added to the raw uint16 counts before pcim's percentile normalisation:

- `debris`: 1-2 large irregular autofluorescent blobs (radius 5-9 px) in the DNA and Actin channels,
  off the cells (no PH3: autofluorescence is weak in the far-red);
- `border`: a bright band along one field edge (meniscus glare, decay length 2-4 px), every channel;
- `gradient`: stray light: an additive ramp rising to one side of the field, every channel;
- `specks`: 2-4 small specks (radius 1-1.6 px) saturated at the detector ceiling (65535), every channel.

Models (MaxPoolNet or SmallResNet of _common.py, trained on one CPU thread, cached):

- `shortcut:<kind>`: trained on confounded labels, as when a treatment's wells share an artefact:
  every `mitotic`-labelled training field carries the artefact, but only half of them show mitotic
  cells; `negative` fields show neither. The network may use the cells and the artefact; what it uses
  on a plate is measured by the counterfactual below.
- `clean`: the same architecture trained on fields whose artefacts (each field: a random kind with
  probability 1/2) are independent of the class: it learns to ignore them.

A plate (`plate(kind, layout)`, 6 x 8 wells, one field each): half the wells have mitotic cells
(random), and the artefact sits in a random third of the wells (`layout="random"`) or in the outer ring
of the plate (`layout="edge"`, 24 of 48 wells, as evaporation does). Each field comes with its
counterfactual without the artefact (`x_clean`: same draws, same noise), the artefact's mask, the nuclei
labels (as a segmentation gives them; the artefact is never labelled) and the raw counts (for the
saturation mask).

Truth of a field, for a model: `shortcut` when the artefact is there and removing it changes the
predicted class (the call is made for the artefact); `clean` when there is no artefact, or removing it
changes p(predicted class) by less than 0.1; `mixed` otherwise (the model uses the artefact and the
cells together; neither counted as found nor as a false alarm).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _common as C

KINDS = ("debris", "border", "gradient", "specks")
LAYOUTS = ("random", "edge")
TRAIN_SEED, TEST_SEED, PLATE_SEED = 31, 32, 33
N_TRAIN, N_TEST = 1600, 400
RECIPES = {"maxpool": {"epochs": 6, "lr": 3e-3, "weight_decay": 0.0},
           "resnet": {"epochs": 6, "lr": 3e-3, "weight_decay": 1e-4}}
ROWS, COLS = 6, 8  # a 48-well plate: 24 edge wells, 24 inner ones
SHOW_CELLS = 0.5  # shortcut training: the share of `mitotic`-labelled fields that show mitotic cells
RECIPE = "b"  # part of the cache key: bump when the training data or recipe changes
CLEAN_EFFECT = 0.1  # |p(pred) - p(pred | no artefact)| below this: the model ignores the artefact


# --------------------------------------------------------------------------------------------------
# artefacts


def _disc_free(labels: np.ndarray, r: float, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A centre whose disc of radius r + 2 holds no labelled pixel (up to 100 tries, then anywhere)."""
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(100):
        cy, cx = rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
        if not labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2) ** 2].any():
            return cy, cx
    return rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)


def add_artefact(img: np.ndarray, kind: str, rng: np.random.Generator,
                 labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the field with the artefact, uint16 (3, H, W); the artefact's mask, bool (H, W))."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _, h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    labels = np.zeros((h, w), np.int32) if labels is None else labels
    add = np.zeros((3, h, w))
    out = img.astype(np.float64)
    if kind == "debris":
        profile = np.zeros((h, w))
        for _ in range(int(rng.integers(1, 3))):
            r = rng.uniform(5.0, 9.0)
            cy, cx = _disc_free(labels, r, rng, r)
            blob = np.zeros((h, w))
            for _ in range(4):
                oy, ox = rng.normal(0, r / 3, 2)
                s = r * rng.uniform(0.35, 0.55)
                blob += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * s * s))
            profile = np.maximum(profile, blob / blob.max())
        mask = profile > 0.15
        add[0] = rng.uniform(2500, 4500) * profile
        add[2] = rng.uniform(2500, 4500) * profile
    elif kind == "border":
        side = int(rng.integers(4))
        d = (yy, h - 1 - yy, xx, w - 1 - xx)[side]
        lam = rng.uniform(2.0, 4.0)
        profile = np.exp(-d / lam)
        mask = profile > 0.1
        add = np.stack([rng.uniform(a, b) * profile for a, b in ((1500, 3000), (1500, 3000), (1500, 3000))])
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = ((yy - h / 2) * math.sin(theta) + (xx - w / 2) * math.cos(theta)) / (0.5 * math.hypot(h, w))
        ramp = ((t + 1) / 2).clip(0, 1) ** 3
        mask = ramp > 0.3
        add = np.stack([rng.uniform(1200, 2200) * ramp for _ in range(3)])
    else:  # specks
        mask = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(2, 5))):
            r = rng.uniform(1.0, 1.6)
            cy, cx = rng.uniform(2, h - 2), rng.uniform(2, w - 2)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        out[:, mask] = 65535.0
    if kind != "specks":
        out = out + rng.poisson(add)
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16), mask


# --------------------------------------------------------------------------------------------------
# training


def _fields(n: int, seed: int, rule) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised fields and their labels (classes alternate); rule(label, rng) -> (whether the field
    has mitotic cells, the artefact kind or None)."""
    dm = C.demo_module()
    rng = np.random.default_rng(seed)
    art_rng = np.random.default_rng([seed, 1])
    xs, ys = [], []
    for i in range(n):
        label = i % 2
        cells, kind = rule(label, art_rng)
        img, _, lab = dm.make_field(rng, cells, 128, return_labels=True)
        if kind is not None:
            img, _ = add_artefact(img, kind, art_rng, lab)
        xs.append(dm.percentile_normalize(img))
        ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def _shortcut_rule(kind: str):
    """Confounded labels, as when a treatment's wells share an artefact: every `mitotic`-labelled field
    carries the artefact, only half of them show mitotic cells; `negative` fields show neither."""
    return lambda label, rng: ((rng.random() < SHOW_CELLS), kind) if label else (False, None)


def _clean_rule(label, rng):
    """The label is the cells; an artefact (a random kind) in half the fields of either class."""
    return bool(label), (KINDS[int(rng.integers(len(KINDS)))] if rng.random() < 0.5 else None)


def _no_artefact(label, rng):
    return bool(label), None


def model(name: str, arch: str = "maxpool"):
    """(TorchScript model, info) of `clean` or `shortcut:<kind>`, trained on first use and cached."""
    if name == "clean":
        rule = _clean_rule
    elif name.startswith("shortcut:") and name.split(":", 1)[1] in KINDS:
        rule = _shortcut_rule(name.split(":", 1)[1])
    else:
        raise ValueError(f"model must be 'clean' or 'shortcut:<kind>' with kind in {KINDS}, got {name!r}")
    recipe = RECIPES[arch]

    def build():
        with C.deterministic_torch(0):
            xtr, ytr = _fields(N_TRAIN, TRAIN_SEED, rule)
            xte, yte = _fields(N_TEST, TEST_SEED, rule)
            xcl, ycl = _fields(N_TEST, TEST_SEED, _no_artefact)
            net = C.make_net(arch, 3)
            info = C.fit(net, (xtr, ytr), {"": (xte, yte), "no_artefacts": (xcl, ycl)}, epochs=recipe["epochs"],
                         lr=recipe["lr"], weight_decay=recipe["weight_decay"], seed=0,
                         label=f"shortcut-{name}-{arch}")
            ts = C.export(net, 3)
        info.update(arch=arch, task=f"shortcut {name}")
        return ts, info

    return C.cached_model(f"shortcut_{name.replace(':', '_')}_{arch}_{C.VERSION}{RECIPE}", build)


def small_model(kind: str, n_train: int = 480, epochs: int = 6, seed: int = 0):
    """A fast shortcut model for tests: the demo's DemoNet trained (not cached, about 50 s on one thread)
    on n_train fields where `kind` marks `mitotic` (with 240 fields and 4 epochs it stays unsure,
    p ~ 0.7, and a featureless field keeps most of that: PCIM_Fit calls most of its maps
    no-local-evidence). Its clean counterpart is the bundled
    sample_plates/demo/classifier.ts (the same architecture trained on the demo's clean fields)."""
    dm = C.demo_module()
    with C.deterministic_torch(seed):
        x, y = _fields(n_train, TRAIN_SEED, _shortcut_rule(kind))
        net = dm.DemoNet()
        C.fit(net, (x, y), (x[:32], y[:32]), epochs=epochs, lr=3e-3, seed=seed, label=f"small-shortcut-{kind}")
        return C.load_frozen(C.export(net, 3))


def demo_classifier():
    """The bundled demo classifier (DemoNet trained on clean demo fields)."""
    return C.load_frozen(C.DEMO_DIR / "classifier.ts")


# --------------------------------------------------------------------------------------------------
# plates


def well_name(r: int, c: int) -> str:
    return f"{'ABCDEFGHIJKLMNOP'[r]}{c + 1:02d}"


def edge_well(r: int, c: int, rows: int = ROWS, cols: int = COLS) -> bool:
    return r in (0, rows - 1) or c in (0, cols - 1)


def plate(kind: str, layout: str = "random", seed: int = PLATE_SEED, rows: int = ROWS, cols: int = COLS) -> dict:
    """One field per well of a rows x cols plate; the artefact in a random third of the wells or in the
    outer ring. Keys: wells, raw (B, 3, H, W) uint16 numpy, x / x_clean float32 (B, 3, H, W) normalised,
    artefact (B,) bool, artefact_mask (B, H, W) bool, mitotic (B,) bool, labels (B, H, W) int32,
    classes, channels, kind, layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dm = C.demo_module()
    rng = np.random.default_rng([seed, KINDS.index(kind), LAYOUTS.index(layout)])
    art_rng = np.random.default_rng([seed, KINDS.index(kind), LAYOUTS.index(layout), 1])
    n = rows * cols
    mitotic = np.zeros(n, bool)
    mitotic[rng.permutation(n)[: n // 2]] = True
    if layout == "edge":
        artefact = np.array([edge_well(i // cols, i % cols, rows, cols) for i in range(n)])
    else:
        artefact = np.zeros(n, bool)
        artefact[rng.permutation(n)[: n // 3]] = True
    wells, raws, xs, xcs, masks, labs = [], [], [], [], [], []
    for i in range(n):
        img, _, lab = dm.make_field(rng, bool(mitotic[i]), 128, return_labels=True)
        clean = img
        mask = np.zeros(img.shape[1:], bool)
        if artefact[i]:
            img, mask = add_artefact(img, kind, art_rng, lab)
        wells.append(well_name(i // cols, i % cols))
        raws.append(img)
        xs.append(dm.percentile_normalize(img))
        xcs.append(dm.percentile_normalize(clean))
        masks.append(mask)
        labs.append(lab.astype(np.int32))
    return {"wells": wells, "raw": np.stack(raws), "x": torch.from_numpy(np.stack(xs)),
            "x_clean": torch.from_numpy(np.stack(xcs)), "artefact": torch.from_numpy(artefact),
            "artefact_mask": torch.from_numpy(np.stack(masks)), "mitotic": torch.from_numpy(mitotic),
            "labels": torch.from_numpy(np.stack(labs)), "classes": list(dm.CLASSES), "channels": list(dm.CHANNELS),
            "kind": kind, "layout": layout, "rows": rows, "cols": cols}


@torch.no_grad()
def truth(model_, data: dict, batch: int = 32) -> dict:
    """Per field: predicted class, p(predicted), p(predicted | no artefact), and the truth
    (`shortcut` | `clean` | `mixed`, see the module docstring)."""
    p, pc = [], []
    for i in range(0, len(data["x"]), batch):
        p.append(model_(data["x"][i : i + batch]).float().softmax(1))
        pc.append(model_(data["x_clean"][i : i + batch]).float().softmax(1))
    p, pc = torch.cat(p), torch.cat(pc)
    pred = p.argmax(1)
    p_pred, p_clean = p.gather(1, pred[:, None])[:, 0], pc.gather(1, pred[:, None])[:, 0]
    flips = pc.argmax(1) != pred
    effect = p_pred - p_clean
    labels = []
    for has, flip, eff in zip(data["artefact"].tolist(), flips.tolist(), effect.abs().tolist(), strict=True):
        labels.append("shortcut" if has and flip else "clean" if (not has or eff < CLEAN_EFFECT) else "mixed")
    return {"pred": pred, "p_pred": p_pred, "p_clean": p_clean, "truth": labels}
