"""Evaluation set `ihc`: REAL bright-field RGB (immunohistochemistry), 3 classes, fields tiled for the model.

Source: scikit-image==0.26.0's wheel ships `skimage/data/ihc.png` (512x512 RGB, colon tissue with a
DAB (brown) immunostain and a haematoxylin (blue) counterstain; BSD-3). Fetched once with `pip download`
into benchmarks/.cache/evalsets/ (never committed); DataUnavailableError when the index is unreachable.

Ground truth by colour deconvolution: the Ruifrok & Johnston haematoxylin / eosin / DAB matrix
(skimage.color.rgb2hed, written out below in numpy: 3x3 numbers, no dependency), and a DAB optical
density above DAB_THRESHOLD marks a DAB-positive pixel (about half of the image: the glands).

The task: how much of a field is DAB-positive, in three classes, `low` (< 4 % of the pixels), `medium`
(4-19 %) and `high` (>= 19 %). Every field is a real crop whose DAB is kept only in random round islands
(3-12 px radius, centred on DAB-positive pixels) until a drawn share of the field is positive, and
removed everywhere else by deconvolution (DAB density set to 0, haematoxylin and eosin untouched, then
recomposed to RGB): the stroma, nuclei and glands stay real, only the brown is where the generator
put it. So the evidence is many stained objects spread over the field, covering 6-45 % of it for the
positive classes, and its exact pixels are known: mask = the pixels still DAB-positive after the edit.
`x_null` = the same field with all DAB removed (a `low` field).

The model: a BatchNorm ResNet with global average pooling (SmallResNet, 3 classes) trained on 64 px
tiles; evaluation fields are 176 px, so every field is cut into 3 x 3 tiles of 64 px (8 px overlap),
as `model.input_size: [64, 64]` makes pcim do. The network itself is fully convolutional (average
pooling), so it can also be run on the whole field (model.aggregate: whole-field).

Split: training tiles lie in x < SPLIT_X; evaluation fields are the rightmost 176 columns
(x >= 336), never seen in training; crops are flipped / rotated by 90 degrees at random.
Normalisation: fixed, 0..255 -> 0..1 (bright-field: a per-field percentile stretch would change the
colours field by field and tile statistics would differ from the field's).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import _common as C

PACKAGE = "scikit-image==0.26.0"
FILES = {"ihc.png": ("skimage/data/ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef")}
CLASSES = ("low", "medium", "high")
CHANNELS = ("R", "G", "B")
TILE = 64
FIELD = 176  # 3 x 3 tiles of 64 px with 8 px overlap
SPLIT_X = 320  # training tiles: x < 320; evaluation fields: x >= 512 - FIELD = 336
DAB_THRESHOLD = 0.05  # DAB optical density (rgb2hed units) above which a pixel is DAB-positive
# class = DAB-positive share of the field: low < 0.04 <= medium < 0.19 <= high; drawn shares keep clear
# of the boundaries (an island can overshoot the drawn share by one island)
BOUNDS = (0.04, 0.19)
DRAW = {0: (0.0, 0.025), 1: (0.06, 0.14), 2: (0.25, 0.45)}
RECIPE = {"n_train": 3000, "epochs": 8, "lr": 3e-3, "weight_decay": 1e-4}
TRAIN_SEED, TEST_SEED, EVAL_SEED = 20, 21, 22

# skimage.color: rgb_from_hed (Ruifrok & Johnston 2001) and separate_stains / combine_stains
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = np.log(1e-6)

DataUnavailableError = C.DataUnavailableError


def rgb_to_stains(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> (..., 3) haematoxylin, eosin, DAB densities, NOT clipped at 0 (so
    stains_to_rgb gives the image back exactly); skimage's rgb2hed is this clipped at 0."""
    return (np.log(np.maximum(rgb, 1e-6)) / _LOG_ADJUST) @ HED_FROM_RGB


def rgb2hed(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hed for RGB in [0, 1]."""
    return np.maximum(rgb_to_stains(rgb), 0)


def stains_to_rgb(hed: np.ndarray) -> np.ndarray:
    """skimage.color.hed2rgb (combine_stains): densities -> RGB in [0, 1]."""
    return np.clip(np.exp((hed * _LOG_ADJUST) @ RGB_FROM_HED), 0, 1)


def ihc_image() -> np.ndarray:
    """ihc.png as float64 RGB (512, 512, 3) in [0, 1], cached after the first call."""
    path = C.wheel_files(PACKAGE, FILES, "scikit-image-0.26.0", "ihc")["ihc.png"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def label_of(share: float) -> int:
    """Class of a field from its DAB-positive share."""
    return int(share >= BOUNDS[0]) + int(share >= BOUNDS[1])


def make_crop(rng, stains, y0, x0, size, cls):
    """One field of class `cls` from the crop at (y0, x0), or None when the crop has too little DAB.

    Returns (rgb float64 (3, size, size) in [0, 1], mask bool (size, size), rgb_null, share)."""
    dm = C.demo_module()
    s = stains[y0 : y0 + size, x0 : x0 + size]
    positive = np.maximum(s[..., 2], 0) > DAB_THRESHOLD
    lo, hi = DRAW[cls]
    want = rng.uniform(lo, hi)
    if positive.mean() < want + 0.05:
        return None
    yy, xx = np.mgrid[0:size, 0:size]
    keep = np.zeros((size, size), dtype=bool)
    r_lo, r_hi = (3, 7) if cls < 2 else (5, 12)
    while (keep & positive).mean() < want:
        ys, xs = np.nonzero(positive & ~keep)
        i = int(rng.integers(len(ys)))
        r = rng.uniform(r_lo, r_hi)
        keep |= (yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= r * r
    soft = np.clip(dm.gaussian_blur(keep.astype(np.float64), 0.7), 0, 1)
    # haematoxylin and eosin clipped at 0 everywhere, as rgb2hed does (their negative residues in
    # stained regions would tint unstained tissue cyan once its DAB is gone), DAB kept in the islands:
    # inside and outside the islands the pixels differ by their DAB alone
    null = np.maximum(s, 0)
    null[..., 2] = 0.0
    edited = null.copy()
    edited[..., 2] = np.maximum(s[..., 2], 0) * soft
    mask = np.maximum(edited[..., 2], 0) > DAB_THRESHOLD
    share = float(mask.mean())
    if label_of(share) != cls:
        return None
    return (np.moveaxis(stains_to_rgb(edited), -1, 0), mask, np.moveaxis(stains_to_rgb(null), -1, 0), share)


def _dihedral_np(a: np.ndarray, op: int) -> np.ndarray:
    if op >= 4:
        a = a[..., ::-1]
    return np.ascontiguousarray(np.rot90(a, op % 4, axes=(-2, -1)))


def make_set(n, seed, size, split, classes=(0, 1, 2)):
    """n fields of `size` px: split 'train' (x < SPLIT_X) or 'eval' (the rightmost FIELD columns).

    Classes cycle through `classes`. Returns x float32 (n, 3, size, size) in [0, 1] (fixed
    normalisation), y long (n,), mask bool (n, size, size), x_null float32, share float (n,)."""
    stains = rgb_to_stains(ihc_image())
    h, w = stains.shape[:2]
    rng = np.random.default_rng([seed, size])
    xs, ys, ms, ns, shares = [], [], [], [], []
    for i in range(n):
        cls = classes[i % len(classes)]
        for _ in range(10_000):
            y0 = int(rng.integers(0, h - size + 1))
            if split == "train":
                if size > SPLIT_X:
                    raise ValueError(f"training crops must fit in x < {SPLIT_X}")
                x0 = int(rng.integers(0, SPLIT_X - size + 1))
            else:
                x0 = int(rng.integers(w - FIELD, w - size + 1))
            out = make_crop(rng, stains, y0, x0, size, cls)
            if out is not None:
                break
        else:
            raise RuntimeError(f"no {size} px crop of class {CLASSES[cls]} in the {split} region")
        rgb, m, null, share = out
        op = int(rng.integers(0, 8))
        xs.append(_dihedral_np(rgb, op))
        ns.append(_dihedral_np(null, op))
        ms.append(_dihedral_np(m, op))
        ys.append(cls)
        shares.append(share)
    return (torch.from_numpy(np.stack(xs).astype(np.float32)), torch.tensor(ys, dtype=torch.long),
            torch.from_numpy(np.stack(ms)), torch.from_numpy(np.stack(ns).astype(np.float32)),
            torch.tensor(shares))


def _tiles(x: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """(B * n, C, tile, tile): the tiles pcim cuts from (B, C, H, W) fields (row-major per field)."""
    from pcim_cli.engine import tiling

    grid = tiling.plan_tiles(tuple(x.shape[-2:]), (tile, tile))
    return torch.cat([tiling.cut(f, grid, range(grid.n_tiles)) for f in x]), grid.n_tiles


@torch.no_grad()
def field_accuracy(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Field-level accuracy when the tiles' outputs are combined by mean probability, mean logit or the
    largest probability, and when the model runs on the whole (untiled) field."""
    tiles, n = _tiles(x)
    logits = torch.cat([model(tiles[i : i + 64]) for i in range(0, len(tiles), 64)]).view(len(x), n, -1)
    probs = logits.softmax(-1)
    preds = {
        "mean_prob": probs.mean(1).argmax(1),
        "mean_logit": logits.mean(1).argmax(1),
        "max_prob": probs.amax(1).argmax(1),
        "whole_field": torch.cat([model(x[i : i + 16]) for i in range(0, len(x), 16)]).argmax(1),
    }
    return {f"field_accuracy_{k}": float((v == y).float().mean()) for k, v in preds.items()}


def _model():
    def build():
        r = RECIPE
        with C.deterministic_torch(0):
            train = make_set(r["n_train"], TRAIN_SEED, TILE, "train")[:2]
            test = make_set(600, TEST_SEED, TILE, "eval")[:2]
            net = C.ARCHS["resnet"](in_channels=3, n_classes=3)
            info = C.fit(net, train, test, epochs=r["epochs"], lr=r["lr"], weight_decay=r["weight_decay"],
                         seed=0, label="ihc-resnet")
            x, y, _, xn, _ = make_set(90, TEST_SEED + 100, FIELD, "eval")
            info.update(field_accuracy(net, x, y))
            info["n_test_fields"] = len(x)
            pos = y > 0
            tiles_x, n = _tiles(x[pos])
            tiles_n, _ = _tiles(xn[pos])
            probs = net(tiles_x).softmax(1).view(-1, n, 3).mean(1)
            probs_n = net(tiles_n).softmax(1).view(-1, n, 3).mean(1)
            yt = y[pos]
            info["evidence_p_target"] = float(probs.gather(1, yt[:, None]).mean())
            info["evidence_p_target_without_evidence"] = float(probs_n.gather(1, yt[:, None]).mean())
            info["evidence_flip_rate"] = float((probs_n.argmax(1) != yt).float().mean())
            ts = C.export(net, 3)
        info.update(arch="resnet", task="ihc", recipe=r, tile=TILE, field=FIELD)
        return ts, info

    return C.cached_model(f"ihc_resnet_{C.VERSION}", build)


def ihc(n: int = 32, seed: int = EVAL_SEED, classes: tuple[int, ...] = (1, 2)) -> dict:
    """n held-out 176 px fields (alternately medium and high by default), their DAB masks, and the
    3-class ResNet trained on 64 px tiles; `tile` says the model's input size (fields are tiled)."""
    model, info = _model()
    x, y, mask, x_null, share = make_set(n, seed, FIELD, "eval", classes)
    return {
        "name": "ihc-resnet-176",
        "x": x,
        "mask": mask,
        "target": y,
        "y": y,
        "evidence_classes": [1, 2],  # the DAB-positive pixels make medium and high; low rests on their absence
        "model": model,
        "x_null": x_null,
        "classes": list(CLASSES),
        "channels": list(CHANNELS),
        "tile": (TILE, TILE),
        "share": share,
        "info": info,
    }
