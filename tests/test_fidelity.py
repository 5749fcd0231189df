"""explain.fidelity's curves at the fewest forwards (engine/fidelity.py, issue 28): the same AUCs as the
plain perturbation curves on the same grid, with the points that do not depend on the map measured once
per field, and the stain check's trivial maps once per field whatever its number of targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch

from pcim_cli.engine import fidelity, metrics, trivial
from pcim_cli.engine.pcim import PcimOptions, fit_pcim
from pcim_cli.io.images import normalize

DEMO = Path(__file__).resolve().parents[1] / "sample_plates" / "demo"


class Counting(torch.nn.Module):
    """The classifier, counting the images it is called on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.model(x)


def _demo() -> tuple[torch.nn.Module, torch.Tensor]:
    model = torch.jit.load(str(DEMO / "classifier.ts")).eval()
    fields = []
    for site in ("A01_s1", "B02_s2"):
        raw = np.stack([tifffile.imread(DEMO / "images" / f"{site}_w{c}.tif") for c in (1, 2, 3)])
        fields.append(torch.from_numpy(normalize(raw, "percentile", low=1.0, high=99.8)))
    return model, torch.stack(fields)


def test_fidelity_aucs_equal_the_plain_curves_with_map_free_points_once_per_field() -> None:
    model, fields = _demo()
    # two fields, each explained for both classes (a field's targets come in a row, as the worker queues them)
    x = fields.repeat_interleave(2, 0)
    target = torch.tensor([0, 1, 0, 1])
    maps = fit_pcim(model, x, target, PcimOptions(steps=3)).maps
    with torch.no_grad():
        p0 = torch.softmax(model(x), 1).gather(1, target[:, None])[:, 0]
    counting = Counting(model)
    dele, ins = fidelity.deletion_insertion(counting, x, maps, target, p0, chunk=7)
    grid = fidelity.FRACTIONS
    ref_del = metrics.deletion_auc(model, x, maps, target, fractions=grid)
    ref_ins = metrics.insertion_auc(model, x, maps, target, fractions=grid, substrate="blur")
    torch.testing.assert_close(dele, ref_del, rtol=0, atol=1e-5)
    torch.testing.assert_close(ins, ref_ins, rtol=0, atol=1e-5)
    # every map's own points between the ends, and per field one all-deleted and one blurred image
    assert counting.images == 4 * 2 * (len(grid) - 2) + 2 * 2


def test_stain_check_measures_the_trivial_maps_once_per_field() -> None:
    model, fields = _demo()
    x = fields.repeat_interleave(2, 0)
    target = torch.tensor([0, 1, 0, 1])
    opts = PcimOptions(steps=3)
    maps = fit_pcim(model, x, target, opts).maps
    with torch.no_grad():
        p0 = torch.softmax(model(x), 1).gather(1, target[:, None])[:, 0]
    rows = [True, True, False, False]  # the first field's two targets
    counting = Counting(model)
    got = fidelity.stain_check_rows(counting, x, maps, target, p0, opts, ("DNA", "PH3", "Actin"), rows)
    ref = trivial.stain_check_rows(model, x, maps, target, opts, ("DNA", "PH3", "Actin"), rows)
    assert got[2] is None and got[3] is None
    for a, b in zip(got[:2], ref[:2], strict=True):
        assert a["fractions"] == b["fractions"] and a["curves"].keys() == b["curves"].keys()
        for name in a["curves"]:
            torch.testing.assert_close(torch.tensor(a["curves"][name]), torch.tensor(b["curves"][name]),
                                       rtol=0, atol=1e-5)
    points = len(trivial.HALVING) - 1  # the first point is p(target | x)
    # the maps of both targets, then 3 intensities + the contrast for the one field
    assert counting.images == 2 * points + 4 * points
