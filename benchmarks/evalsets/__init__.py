"""Evaluation sets with KNOWN evidence, for comparing attribution methods (PCIM vs baselines).

Each set is a dict:
    name    str
    x       float32 tensor (B, C, H, W), percentile-normalised per channel and field (1 / 99.8), as pcim does
    mask    bool tensor (B, H, W), the true evidence (the pixels that make the class)
    target  long tensor (B,), the class the evidence supports (1 = "mitotic")
    model   TorchScript module, eval mode, parameters with requires_grad=False; returns logits (B, K)
    classes, channels, info (model metrics: train/test accuracy, sha256, ...)
    tile    (only sets whose fields are larger than the model's input, e.g. ihc) the model's input
            size: fields are cut into tiles as pcim does; score them whole (evalsets.tiled)

    from benchmarks.evalsets import load, confident
    ev = load("demo")                       # demo plate generator + the bundled classifier.ts
    ev = load("demo", arch="resnet")        # same data, a BatchNorm ResNet with global average pooling
    ev = load("nuclei", size=256)           # real nuclei (stardist's image), semi-synthetic marker
    ev = load("nuclei", arch="resnet")
    ev = load("confident", base="nuclei", temperature=0.05, arch="resnet")   # saturated softmax
    ev = load("ihc")                        # real bright-field RGB, 3 classes, 176 px fields, 64 px model input
    ev = load("distractor")                 # demo fields + PH3/DNA-bright decoys the classifier ignores
    ev = load("density")                    # real nuclei, nuclear density in 3 classes, 160 px fields, 64 px input
    m = confident(ev["model"], 0.05)        # or wrap any module

Trained models and downloaded data are cached in benchmarks/.cache/evalsets/ ($PCIM_EVALSETS_CACHE);
the first call of a (set, arch) trains its model (1-3.5 minutes on one CPU thread), later calls take
about a second. Measured accuracies and limits: README.md beside this file.
"""

from __future__ import annotations

from ._common import VERSION, cache_dir, confident
from .demo import demo
from .density import density
from .distractor import distractor
from .ihc import ihc
from .nuclei import DataUnavailableError, nuclei

SETS = {"demo": demo, "nuclei": nuclei, "ihc": ihc, "distractor": distractor, "density": density}

__all__ = ["load", "demo", "nuclei", "ihc", "distractor", "density", "confident", "cache_dir", "DataUnavailableError",
           "SETS", "VERSION"]


def load(name: str, **kw) -> dict:
    """load("demo" | "nuclei" | "ihc" | "distractor" | "density", **kw), or load("confident", base="demo",
    temperature=0.05, **kw)."""
    if name == "confident":
        base = kw.pop("base", "demo")
        temperature = kw.pop("temperature", 0.05)
        return confident(load(base, **kw), temperature)
    if name not in SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose from {sorted(SETS) + ['confident']}")
    return SETS[name](**kw)
