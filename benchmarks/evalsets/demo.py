"""Evaluation set `demo`: positive (mitotic) fields from the demo plate's generator, fresh seed."""

from __future__ import annotations

import numpy as np
import torch

from . import _common as C

EVAL_SEED = 3  # make_demo uses 20240 (plate), 1 (train), 2 (test)


def _resnet_model():
    def build():
        dm = C.demo_module()
        with C.deterministic_torch(0):
            xtr, ytr, _ = dm.make_dataset(2000, dm.TRAIN_SEED)
            xte, yte, _ = dm.make_dataset(400, dm.TEST_SEED)
            net = C.make_net("resnet", 3)
            info = C.fit(net, (xtr, ytr), (xte, yte), epochs=6, lr=3e-3, weight_decay=1e-4, seed=0, label="demo-resnet")
            ts = C.export(net, 3)
        info.update(arch="resnet", task="demo")
        return ts, info

    return C.cached_model(f"demo_resnet_{C.VERSION}", build)


def demo(n: int = 32, arch: str = "maxpool", size: int = 128, seed: int = EVAL_SEED,
         classes: tuple[int, ...] = (1,)) -> dict:
    """n demo fields (positive by default; `classes` cycles, e.g. (0, 1): negative and mitotic fields
    alternately), normalised as pcim does, with their PH3-positive-nuclei masks (empty for negatives).

    arch="maxpool": the bundled sample_plates/demo/classifier.ts (DemoNet, global max pooling);
    arch="resnet": a SmallResNet (BatchNorm, global average pooling) trained on the same generator
    (cached under benchmarks/.cache/evalsets/models/).
    """
    dm = C.demo_module()
    if arch == "maxpool":
        path = C.DEMO_DIR / "classifier.ts"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `python {C.DEMO_DIR / 'make_demo.py'}` first")
        model, info = C.load_frozen(path), {"arch": "maxpool", "path": str(path)}
    elif arch == "resnet":
        model, info = _resnet_model()
    else:
        raise ValueError(f"arch must be 'maxpool' or 'resnet', got {arch!r}")
    if not set(classes) <= {0, 1} or not classes:
        raise ValueError(f"classes must be drawn from (0, 1), got {classes}")
    rng = np.random.default_rng([seed, size])
    xs, ms, ns, ls = [], [], [], []
    y = torch.tensor([classes[i % len(classes)] for i in range(n)], dtype=torch.long)
    for i in range(n):
        img, m, null, lab = dm.make_field(rng, bool(y[i]), size, return_null=True, return_labels=True)
        xs.append(dm.percentile_normalize(img))
        ns.append(dm.percentile_normalize(null))
        ms.append(m)
        ls.append(lab.astype(np.int32))
    return {
        "name": f"demo-{arch}" + ("" if size == 128 else f"-{size}"),
        "x": torch.from_numpy(np.stack(xs)),
        "mask": torch.from_numpy(np.stack(ms)),
        "target": y,
        "y": y,
        "evidence_classes": [1],
        "model": model,
        "x_null": torch.from_numpy(np.stack(ns)),
        "labels": torch.from_numpy(np.stack(ls)),
        "classes": list(dm.CLASSES),
        "channels": list(dm.CHANNELS),
        "info": info,
    }
