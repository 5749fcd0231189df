#!/usr/bin/env python
"""Regenerate the bundled demo plate DEMO01 (everything in sample_plates/demo/).

    python sample_plates/demo/make_demo.py            # writes next to this file
    python sample_plates/demo/make_demo.py --out DIR  # writes elsewhere

    python sample_plates/demo/make_demo.py --threads 1  # on a busy machine (another, equally good model)
    python sample_plates/demo/make_demo.py --plate-only # images, masks, labels, layout, plate.yaml; no training

Deterministic: seeded numpy + torch, a fixed torch thread count (2); two runs on the same machine give
byte-identical files. Another thread count, or a CPU with other vector units, gives other model bits
(same accuracy); images, masks, layout.csv and plate.yaml do not depend on either. About 80-110 s on an
idle 2-core machine (two torch threads thrash when another process is busy: then pass --threads 1).

What it writes:
  images/{well}_s{field}_w{n}.tif  24 wells (A-D x 1-6) x 2 fields x 3 channels (w1 DNA, w2 PH3, w3 Actin),
                                   128x128 uint16, zlib-compressed (ImageXpress-style names)
  masks/{well}_s{field}.tif        uint8 0/1 ground truth: the PH3-positive (mitotic) nuclei, dilated 1 px;
                                   all zeros in negative fields
  labels/{well}_s{field}_nuclei.tif  uint16 nuclei label images (0 = background, 1..N = nuclei), as a
                                   segmentation tool writes them: plate.objects.Nuclei
  layout.csv                       well,treatment,concentration_uM,expected_class
  classifier.ts                    TorchScript (traced) DemoNet, logits for [negative, mitotic]; made
                                   byte-reproducible by canonical_torchscript
  plate.yaml                       the plate config (docs/reference/plate-yaml.md)

Importable (the script guards its work behind __main__): make_field, percentile_normalize, DemoNet,
train_model, make_dataset, random_dihedral, accuracy, export_torchscript, canonical_torchscript,
write_plate, gaussian_blur.

The task: a field is `mitotic` when 1-2 nuclei are PH3-positive: bright, granular (condensed chromosome
clumps) PH3 in a nucleus whose DNA is also condensed and brighter. Both classes carry distractors:
sharp bright PH3 debris specks, out-of-focus PH3 haze, bright compact DNA debris (apoptotic bodies)
without PH3, bright Actin aggregates, and faint diffuse PH3 in every interphase nucleus (which the
per-field percentile normalisation stretches up to full scale in negative fields). The class is decided
by appearance only, never by position, so a global-pooling CNN can learn it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent

CHANNELS = ("DNA", "PH3", "Actin")
CLASSES = ("negative", "mitotic")
ROWS = "ABCD"
COLS = range(1, 7)
FIELDS = (1, 2)
PLATE_SEED = 20240
TRAIN_SEED = 1
TEST_SEED = 2
TORCH_SEED = 0
TORCH_THREADS = 2  # fixed so results do not depend on the machine's core count
NORM_LOW, NORM_HIGH = 1.0, 99.8

# --------------------------------------------------------------------------------------------------
# image synthesis
# --------------------------------------------------------------------------------------------------


def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (reflect padding), numpy only."""
    if sigma <= 0:
        return img.astype(np.float64, copy=True)
    k = _gauss_kernel(sigma)
    r = (len(k) - 1) // 2
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect" if out.shape[axis] > r else "edge")
        win = np.lib.stride_tricks.sliding_window_view(p, len(k), axis=axis)
        out = win @ k
    return out


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random texture."""
    n = gaussian_blur(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / (n.std() + 1e-9)


def _ellipse_r(yy, xx, cy, cx, a, b, theta):
    """Normalised elliptic radius (1 on the border)."""
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _soft(r, scale, edge=1.0):
    """Soft-edged disc profile from an elliptic radius: ~1 inside, 0 outside, edge ~`edge` px wide."""
    return 1.0 / (1.0 + np.exp(-(1.0 - r) * scale / edge))


def _dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """Binary dilation with a 3x3 square, `px` times (numpy only)."""
    m = mask.copy()
    for _ in range(px):
        p = np.pad(m, 1)
        out = np.zeros_like(m)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                out |= p[dy : dy + m.shape[0], dx : dx + m.shape[1]]
        m = out
    return m


def _spots(yy, xx, centers, sigmas, amps) -> np.ndarray:
    out = np.zeros(yy.shape, dtype=np.float64)
    for (cy, cx), s, a in zip(centers, sigmas, amps, strict=True):
        out += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * s * s))
    return out


def make_field(rng: np.random.Generator, positive: bool, size: int = 128, return_null: bool = False,
               return_labels: bool = False):
    """One synthetic 3-channel field (DNA, PH3, Actin).

    Returns (img, mask): img uint16 (3, size, size); mask bool (size, size) = the PH3-positive nuclei
    (the class-defining evidence), dilated by 1 px; all False when `positive` is False.
    With return_null=True, (img, mask, img_null): img_null is the same field (same draws, same noise)
    with the mitotic cells' signal subtracted in every channel — the evidence removed.
    With return_labels=True, a nuclei label image is appended: uint16 (size, size), 0 = background,
    nucleus i (in drawing order) = i + 1, its drawn ellipse (a later nucleus wins where two overlap), as
    a segmentation would give it; debris is not labelled. It takes no random draws, so img and mask are
    the same with or without it.
    Nuclei density is that of 8-15 nuclei per 128x128 field, whatever `size`.
    """
    H = W = int(size)
    area = (H * W) / (128.0 * 128.0)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)

    # ---- nuclei placement (rejection sampling, little overlap) ------------------------------------
    n_target = max(2, int(round(rng.integers(8, 16) * area)))
    nuclei = []
    tries = 0
    while len(nuclei) < n_target and tries < 50 * n_target:
        tries += 1
        a = rng.uniform(5.0, 8.5)
        b = a * rng.uniform(0.6, 1.0)
        cy, cx = rng.uniform(3, H - 3), rng.uniform(3, W - 3)
        if all((cy - n[0]) ** 2 + (cx - n[1]) ** 2 > (0.85 * (a + n[2])) ** 2 for n in nuclei):
            nuclei.append((cy, cx, a, b, rng.uniform(0, math.pi)))
    n_mit = int(rng.integers(1, 3)) if positive else 0
    # mitotic nuclei must lie (mostly) inside the field, so the evidence is visible
    inside = [i for i, n in enumerate(nuclei) if 7 <= n[0] <= H - 8 and 7 <= n[1] <= W - 8]
    mitotic = set(rng.choice(inside, size=min(n_mit, len(inside)), replace=False).tolist()) if n_mit else set()

    dna = np.zeros((H, W))
    ph3 = np.zeros((H, W))
    actin = np.zeros((H, W))
    mask = np.zeros((H, W), dtype=bool)
    labels = np.zeros((H, W), dtype=np.uint16)
    dna_m, ph3_m, actin_m = np.zeros((H, W)), np.zeros((H, W)), np.zeros((H, W))  # mitotic cells only
    chromatin = _smooth_noise(rng, (H, W), 1.2)
    fibres = _smooth_noise(rng, (H, W), 0.8) + 0.6 * _smooth_noise(rng, (H, W), 3.0)
    ph3_tex = _smooth_noise(rng, (H, W), 2.0)

    for i, (cy, cx, a, b, th) in enumerate(nuclei):
        if i in mitotic:
            # condensed, rounder, brighter chromatin; cell rounds up
            a2 = a * rng.uniform(0.7, 0.85)
            b2 = max(b * rng.uniform(0.7, 0.85), 0.8 * a2)
            r = _ellipse_r(yy, xx, cy, cx, a2, b2, th)
            body = _soft(r, a2, 0.8)
            k = int(rng.integers(7, 14))
            ang = rng.uniform(0, 2 * math.pi, k)
            rad = np.sqrt(rng.uniform(0, 1, k)) * 0.75
            c, s = math.cos(th), math.sin(th)
            u, v = rad * a2 * np.cos(ang), rad * b2 * np.sin(ang)
            centers = list(zip(cy + u * s + v * c, cx + u * c - v * s, strict=True))
            sig = rng.uniform(0.7, 1.3, k)
            clumps = _spots(yy, xx, centers, sig, rng.uniform(0.6, 1.0, k))
            clumps /= clumps.max() + 1e-9
            dna_amp = rng.uniform(1700, 2600)
            t = dna_amp * (0.45 * body + 0.9 * clumps)
            dna += t
            dna_m += t
            ph3_amp = rng.uniform(2500, 6000)
            t = ph3_amp * (0.25 * body + 1.0 * clumps * body)
            ph3 += t
            ph3_m += t
            mask |= r <= 1.0
            labels[r <= 1.0] = i + 1
            R = a2 * rng.uniform(1.5, 1.9)
            rc = _ellipse_r(yy, xx, cy, cx, R, R * rng.uniform(0.9, 1.0), th)
            cell = _soft(rc, R, 2.0)
            t = rng.uniform(700, 1100) * cell * (1.0 + 0.25 * fibres) + 500 * np.exp(
                -((rc - 1.0) ** 2) / 0.02
            )  # cortical ring
            actin += t
            actin_m += t
        else:
            r = _ellipse_r(yy, xx, cy, cx, a, b, th)
            labels[r <= 1.0] = i + 1
            body = _soft(r, a, 1.0)
            dna_amp = rng.uniform(900, 1600)
            dna += dna_amp * body * (1.0 + 0.22 * chromatin) * (1.0 - 0.25 * r.clip(0, 1) ** 2)
            # faint diffuse PH3 in every interphase nucleus (G2 cells a bit more)
            ph3 += rng.uniform(40, 260) * body * (1.0 + 0.15 * ph3_tex)
            A = a * rng.uniform(1.8, 2.6)
            B = A * rng.uniform(0.55, 0.95)
            ocy, ocx = cy + rng.normal(0, 2.0), cx + rng.normal(0, 2.0)
            rc = _ellipse_r(yy, xx, ocy, ocx, A, B, rng.uniform(0, math.pi))
            actin += rng.uniform(350, 800) * _soft(rc, A, 3.0) * (1.0 + 0.35 * fibres).clip(0.2)

    # ---- distractors (both classes) ----------------------------------------------------------------
    # sharp, bright PH3 debris specks (as bright as mitotic PH3)
    k = int(rng.poisson(2.5 * area))
    if k:
        pts = list(zip(rng.uniform(0, H, k), rng.uniform(0, W, k), strict=True))
        ph3 += _spots(yy, xx, pts, rng.uniform(0.5, 1.0, k), rng.uniform(2000, 8000, k))
    # out-of-focus PH3 haze (fluorescent debris above the focal plane)
    if rng.random() < 0.35:
        s = rng.uniform(5, 10)
        ph3 += _spots(yy, xx, [(rng.uniform(0, H), rng.uniform(0, W))], [s], [rng.uniform(300, 1200)])
    # bright compact DNA debris / apoptotic bodies, no PH3
    for _ in range(int(rng.poisson(0.8 * area))):
        cy, cx = rng.uniform(4, H - 4), rng.uniform(4, W - 4)
        rr = rng.uniform(2.0, 4.0)
        r = _ellipse_r(yy, xx, cy, cx, rr, rr * rng.uniform(0.7, 1.0), rng.uniform(0, math.pi))
        dna += rng.uniform(2200, 4000) * _soft(r, rr, 0.7)
        if rng.random() < 0.5:
            actin += rng.uniform(400, 900) * _soft(_ellipse_r(yy, xx, cy, cx, 2 * rr, 2 * rr, 0.0), 2 * rr, 2.0)
    # bright Actin aggregates
    for _ in range(int(rng.poisson(0.5 * area))):
        s = rng.uniform(2.0, 4.5)
        actin += _spots(yy, xx, [(rng.uniform(0, H), rng.uniform(0, W))], [s], [rng.uniform(1500, 3000)])

    # ---- optics + camera ------------------------------------------------------------------------
    dna = gaussian_blur(dna, 0.7)
    ph3 = gaussian_blur(ph3, 0.6)
    actin = gaussian_blur(actin, 1.2)
    gy, gx = rng.uniform(-1, 1, 2)
    illum = 1.0 - 0.12 * (((yy / H - 0.5 - 0.2 * gy) ** 2 + (xx / W - 0.5 - 0.2 * gx) ** 2) * 2.0)
    out = np.empty((3, H, W), dtype=np.uint16)
    null = np.empty((3, H, W), dtype=np.uint16)
    mit = (gaussian_blur(dna_m, 0.7), gaussian_blur(ph3_m, 0.6), gaussian_blur(actin_m, 1.2)) if return_null else None
    for c, (sig, bg) in enumerate(((dna, 90.0), (ph3, 60.0), (actin, 120.0))):
        bg_c = bg * rng.uniform(0.8, 1.25)
        photons = np.clip((sig + bg_c) * illum, 0, None)
        x = rng.poisson(photons) + 100.0 + rng.normal(0.0, 3.0, (H, W))  # shot noise, offset, read noise
        out[c] = np.clip(np.rint(x), 0, 65535).astype(np.uint16)
        if return_null:
            null[c] = np.clip(np.rint(x - mit[c] * illum), 0, 65535).astype(np.uint16)
    result = (out, _dilate(mask, 1)) + ((null,) if return_null else ()) + ((labels,) if return_labels else ())
    return result


def percentile_normalize(img, low: float = NORM_LOW, high: float = NORM_HIGH) -> np.ndarray:
    """Per channel, per field: (x - p_low) / (p_high - p_low) clipped to [0, 1], float32.

    Works on (..., H, W); percentiles are numpy's default ('linear') over the last two axes, computed
    in float64. A flat channel (p_high == p_low) becomes all zeros.
    """
    x = np.asarray(img, dtype=np.float64)
    lo, hi = np.percentile(x, [low, high], axis=(-2, -1), keepdims=True)
    den = hi - lo
    y = np.where(den > 0, (x - lo) / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------------


class DemoNet(nn.Module):
    """Tiny fully-convolutional classifier: per-pixel class evidence, then global max pooling.

    conv3x3 C->16, ReLU, conv3x3 16->32 stride 2, ReLU, conv3x3 32->32, ReLU, conv1x1 32->K,
    global max over (H, W) -> logits (B, K). Receptive field 9 px. Accepts any H, W >= 3.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 2, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Conv2d(2 * width, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = self.head(x)
        return torch.amax(x, dim=(2, 3))


def make_dataset(n: int, seed: int, size: int = 128, balanced: bool = True):
    """n normalised fields (x float32 (n,3,H,W), y long (n,), mask bool (n,H,W)); classes alternate."""
    rng = np.random.default_rng(seed)
    xs, ys, ms = [], [], []
    for i in range(n):
        pos = (i % 2 == 1) if balanced else bool(rng.random() < 0.5)
        img, m = make_field(rng, pos, size)
        xs.append(percentile_normalize(img))
        ys.append(int(pos))
        ms.append(m)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long), torch.from_numpy(np.stack(ms))


def random_dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Independent random flip + rot90 per sample (x: (B, C, H, W) with H == W)."""
    ops = torch.randint(0, 8, (x.shape[0],), generator=g).tolist()
    out = torch.empty_like(x)
    for i, o in enumerate(ops):
        xi = x[i]
        if o >= 4:
            xi = xi.flip(-1)
        out[i] = torch.rot90(xi, o % 4, dims=(-2, -1))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 64):
    """(accuracy, mean probability of the true class)."""
    model.eval()
    correct, ptrue = 0, 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
        ptrue += float(logits.softmax(1).gather(1, y[i : i + batch, None]).sum())
    return correct / len(x), ptrue / len(x)


def train_model(
    n_train: int = 2000,
    n_test: int = 400,
    epochs: int = 8,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = TORCH_SEED,
    train_seed: int = TRAIN_SEED,
    test_seed: int = TEST_SEED,
    model: nn.Module | None = None,
    log=print,
):
    """Train DemoNet (or `model`) on freshly generated fields; returns (model in eval mode, metrics)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    xtr, ytr, _ = make_dataset(n_train, train_seed)
    xte, yte, _ = make_dataset(n_test, test_seed)
    t_data = time.perf_counter() - t0
    log(f"generated {n_train} train + {n_test} test fields in {t_data:.1f}s")
    model = model if model is not None else DemoNet()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(n_train / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        tot = 0.0
        for i in range(0, n_train, batch_size):
            idx = perm[i : i + batch_size]
            xb = random_dihedral(xtr[idx], g)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        acc, _ = accuracy(model, xte, yte)
        log(f"epoch {ep + 1}/{epochs}  loss {tot / n_train:.4f}  test acc {acc:.4f}  ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    tr_acc, tr_p = accuracy(model, xtr, ytr)
    te_acc, te_p = accuracy(model, xte, yte)
    metrics = {
        "train_accuracy": tr_acc,
        "test_accuracy": te_acc,
        "test_mean_p_true": te_p,
        "n_train": n_train,
        "n_test": n_test,
        "epochs": epochs,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    return model, metrics


def canonical_torchscript(raw: bytes, align: int = 64) -> bytes:
    """Make a torch.jit.save archive byte-reproducible.

    Drops the *.debug_pkl records (source ranges with absolute file paths; optional for loading),
    replaces the random `.data/serialization_id` with one derived from the content, and rewrites the
    zip with fixed timestamps, records stored and 64-byte aligned as torch writes them.
    """
    zin = zipfile.ZipFile(io.BytesIO(raw))
    entries = [
        (i.filename, zin.read(i.filename))
        for i in zin.infolist()
        if not i.filename.endswith(".debug_pkl") and not i.filename.endswith(".data/serialization_id")
    ]
    prefix = entries[0][0].split("/")[0]
    h = hashlib.sha256()
    for n, d in entries:
        h.update(n.encode())
        h.update(d)
    entries.append((f"{prefix}/.data/serialization_id", str(int(h.hexdigest()[:32], 16)).zfill(40)[:40].encode()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n, d in entries:
            zi = zipfile.ZipInfo(n, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            zi.external_attr = 0o644 << 16
            pad = (-(out.tell() + 30 + len(n.encode()) + 4)) % align
            zi.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(zi, d)
    return out.getvalue()


def export_torchscript(model: nn.Module, in_channels: int = 3) -> bytes:
    """Trace `model` (eval mode) and return canonical TorchScript bytes (see canonical_torchscript).

    Tracing (not scripting) because scripted archives list module constants in hash-seed order.
    Fully convolutional models stay size-agnostic after tracing.
    """
    model = model.eval()
    with torch.no_grad():
        ts = torch.jit.trace(model, torch.zeros(1, in_channels, 64, 64))
    buf = io.BytesIO()
    torch.jit.save(ts, buf)
    return canonical_torchscript(buf.getvalue())


# --------------------------------------------------------------------------------------------------
# plate
# --------------------------------------------------------------------------------------------------

TREATMENT = {
    1: ("nocodazole", 0.3),
    2: ("nocodazole", 1.0),
    3: ("nocodazole", 3.0),
    4: ("DMSO", 0.0),
    5: ("DMSO", 0.0),
    6: ("DMSO", 0.0),
}


def plate_wells():
    """[(well, treatment, concentration_uM, expected_class)] for the 24-well plate."""
    out = []
    for r in ROWS:
        for c in COLS:
            t, conc = TREATMENT[c]
            out.append((f"{r}{c:02d}", t, conc, "mitotic" if t == "nocodazole" else "negative"))
    return out


PLATE_YAML = """\
# DEMO01 — synthetic 24-well plate bundled with pcim (regenerate: python make_demo.py).
# Relative paths resolve against this file's folder. Every key: docs/reference/plate-yaml.md (or pcim init).
plate:
  name: DEMO01                            # Metadata_Plate in the CSV
  images: images/                         # folder with the TIFFs
  pattern: "{well}_s{field}_w{channel}.tif"   # ImageXpress-style: A01_s1_w1.tif
  channels: {DNA: "1", PH3: "2", Actin: "3"}  # model input order; name -> {channel} token in file names
  layout: layout.csv                      # plate map: well,treatment,concentration_uM,expected_class
  wells: null                             # all 24 wells; e.g. [A01, D06] for a subset
  objects:                                # label images (0 = background, 1..N = objects): per-object tables
    Nuclei: labels/{well}_s{field}_nuclei.tif   # -> out/DEMO01_pcim_Nuclei.csv
model:
  path: classifier.ts                     # TorchScript DemoNet (make_demo.py), logits for the classes below
  classes: [negative, mitotic]            # output names, in order
  input_size: null                        # fully convolutional: whole 128x128 fields, no tiling
  normalize: {method: percentile, low: 1.0, high: 99.8}   # per channel, per field (as in training)
explain:
  method: pcim                            # pcim | saliency | integrated-gradients | occlusion | rise
  target: predicted                       # or: mitotic | layout:expected_class | all
  steps: 49                               # 49 x 2 images + 1 gradient pass = 99 classifier passes per map
  lr: 0.3
  per_channel: false                      # one shared map per field
  seed: 0
compute:
  cluster: local                          # a Dask LocalCluster on this machine (none: in-process)
  workers: 2                              # CPU worker processes (on GPUs: auto = one per GPU)
  device: auto                            # cuda when available, else cpu
  batch_size: 16                          # fields fitted together
output:
  zarr: out/{plate}.zarr                  # OME-Zarr HCS store of the maps
  csv: out/{plate}_pcim.csv               # one row per (well, field, target)
  format: "0.5"                           # OME-NGFF 0.5 (Zarr v3)
"""


def _write_tiff(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib", photometric="minisblack", metadata=None)
    path.write_bytes(buf.getvalue())


def write_plate(out: Path, seed: int = PLATE_SEED):
    """Write images/, masks/, labels/, layout.csv; returns [(well, field, expected_positive, x_normalised)]."""
    for folder in ("images", "masks", "labels"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    fields = []
    wells = plate_wells()
    for wi, (well, _t, _c, cls) in enumerate(wells):
        for f in FIELDS:
            rng = np.random.default_rng([seed, wi, f])
            pos = cls == "mitotic"
            img, m, lab = make_field(rng, pos, 128, return_labels=True)
            for n in range(3):
                _write_tiff(out / "images" / f"{well}_s{f}_w{n + 1}.tif", img[n])
            _write_tiff(out / "masks" / f"{well}_s{f}.tif", m.astype(np.uint8))
            _write_tiff(out / "labels" / f"{well}_s{f}_nuclei.tif", lab)
            fields.append((well, f, pos, percentile_normalize(img)))
    with open(out / "layout.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["well", "treatment", "concentration_uM", "expected_class"])
        for well, t, c, cls in wells:
            w.writerow([well, t, f"{c:g}", cls])
    return fields


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=TORCH_THREADS, help="torch threads (the bundled files: 2)")
    ap.add_argument("--plate-only", action="store_true",
                    help="write images, masks, labels, layout.csv and plate.yaml; keep classifier.ts (seconds)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fields = write_plate(out)
    (out / "plate.yaml").write_text(PLATE_YAML)
    print(f"plate written: {len(fields)} fields ({time.perf_counter() - t0:.1f}s)")
    if args.plate_only:
        return 0

    model, metrics = train_model(n_train=args.n_train, epochs=args.epochs)
    x = torch.from_numpy(np.stack([f[3] for f in fields]))
    y = torch.tensor([int(f[2]) for f in fields])
    metrics["plate_accuracy"], metrics["plate_mean_p_true"] = accuracy(model, x, y)
    ts = export_torchscript(model)
    (out / "classifier.ts").write_bytes(ts)
    loaded = torch.jit.load(io.BytesIO(ts)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5), "exported model disagrees with the trained one"
    metrics["classifier_bytes"] = len(ts)
    metrics["classifier_sha256"] = hashlib.sha256(ts).hexdigest()
    print(json.dumps(metrics, indent=1))
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
