"""Real TorchScript classifiers that misbehave the way users' models do, built around the demo classifier.

Each is scripted and saved to a `.ts` file, so tests load it through `pcim` exactly like a user's export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from plates import DEMO

DEMO_MODEL = DEMO / "classifier.ts"


def _demo() -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(DEMO_MODEL))


class Standardise(torch.nn.Module):
    """(x - mean) / std of each image, then the demo classifier: NaN logits on a blank or constant field."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _demo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return self.inner((x - mean) / std)


class BatchStd(torch.nn.Module):
    """A statistic across the batch (unbiased std over B): NaN logits for a batch of one image, finite for two."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _demo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 0.0 * x.std(dim=0).mean()


class AlwaysNaN(torch.nn.Module):
    """NaN logits whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _demo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * float("nan")


class Only64(torch.nn.Module):
    """Accepts 64 x 64 inputs only (pcim's probe size), and raises on anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _demo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 64:
            raise RuntimeError("this model was exported for 64 x 64 inputs")
        return self.inner(x)


class EdgeGlare(torch.nn.Module):
    """The demo classifier plus a shortcut, the way a classifier learns a well-edge artefact: a spot bright
    in every channel (3 x 3 mean of the darkest channel > GLARE) within 8 px of the field's edge adds to the
    `mitotic` logit, enough to call the field mitotic (tests/test_shortcut_cli.py: only the glare wells'
    DMSO fields become mitotic, and their maps lie on the glare)."""

    GLARE = 0.85

    def __init__(self) -> None:
        super().__init__()
        self.inner = _demo()
        self.glare = self.GLARE  # an attribute TorchScript keeps (a float)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        bright = torch.nn.functional.avg_pool2d(x.amin(dim=1, keepdim=True), 3, 1, 1)[:, 0]
        h, w = x.shape[-2], x.shape[-1]
        band = torch.ones(h, w, dtype=x.dtype, device=x.device)
        band[8 : h - 8, 8 : w - 8] = 0.0
        boost = (60.0 * ((bright * band).amax(dim=(1, 2)) - self.glare)).clamp(min=0.0)
        return torch.stack([logits[:, 0], logits[:, 1] + boost], dim=1)


class FlatIsNegative(torch.nn.Module):
    """The demo classifier; a featureless field (every channel constant) is `negative` with p ~ 1, so its
    negative calls are absence calls (the fully deleted field keeps them). The demo classifier itself
    calls a featureless field `mitotic` (p ~ 0.67)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _demo()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        spread = (torch.amax(x, dim=(2, 3)) - torch.amin(x, dim=(2, 3))).sum(dim=1)
        flat = torch.tensor([10.0, -10.0], dtype=logits.dtype, device=logits.device).expand_as(logits)
        return torch.where((spread < 1e-6)[:, None], flat, logits)


KINDS = {"standardise": Standardise, "batch-std": BatchStd, "always-nan": AlwaysNaN, "only-64": Only64,
         "edge-glare": EdgeGlare, "flat-is-negative": FlatIsNegative}


def make_model(kind: str, path: Path) -> Path:
    """Script the model `kind` (a key of KINDS) and save it as TorchScript at `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(KINDS[kind]().eval()).save(str(path))
    return path
