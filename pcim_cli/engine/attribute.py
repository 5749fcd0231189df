"""One entry point for every attribution method the `explain.method` key can name.

`attribute(model, x, target, method, opts, seeds)` returns a `PcimResult` whatever the method, so the
worker, the store and the CSV treat PCIM and the baselines alike (the fit-only statistics of a
baseline, such as the mixed-image probability, are NaN).
"""

from __future__ import annotations

import torch

from pcim_cli.engine.pcim import Forward, PcimOptions, PcimResult, fit_pcim

METHODS = ("pcim",)


def attribute(model: Forward, x: torch.Tensor, target: torch.Tensor, method: str, opts: PcimOptions,
              seeds: torch.Tensor | None = None) -> PcimResult:
    """Maps (B, M, H, W) of `method` for images x (B, C, H, W) and their target classes (B,)."""
    if method == "pcim":
        return fit_pcim(model, x, target, opts, seeds=seeds)
    raise ValueError(f"unknown attribution method {method!r}; one of {', '.join(METHODS)}")
