"""Peak memory of a field-level fit through TiledForward, with and without chunked model calls.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_field_memory.py none step   # all tiles in one call
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_field_memory.py 32 step     # 32 tiles per call
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_field_memory.py 32 fit      # one PCIM step (attribute)

One 5 x 2160 x 2160 field, 256 px tiles (100 tiles, so 200 tile images per step for the kept and deleted
images), bench.py's fixed-input _TileNet, mean-logit. `step`: one forward + backward of the two images
through the tiled model (what a fit step asks of the model); `fit`: one whole PCIM step (mixing layer,
substrates, loss, Adam). Prints the peak RSS (VmHWM) before and after; run each case in its own process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _TileNet  # noqa: E402

from pcim_cli.engine import field as field_maps  # noqa: E402
from pcim_cli.engine import tiling  # noqa: E402
from pcim_cli.engine.attribute import attribute  # noqa: E402
from pcim_cli.engine.pcim import PcimOptions  # noqa: E402
from pcim_cli.run.device import peak_memory_mib  # noqa: E402


def main(argv: list[str]) -> dict:
    torch.set_num_threads(1)
    chunk = None if argv[0] == "none" else int(argv[0])
    what = argv[1] if len(argv) > 1 else "step"
    model = torch.jit.trace(_TileNet().eval(), torch.rand(2, 5, 256, 256))
    grid = tiling.plan_tiles((2160, 2160), (256, 256))
    forward = field_maps.TiledForward(model, grid, "mean-logit", chunk=chunk)
    x = torch.rand(1, 5, 2160, 2160)
    before = peak_memory_mib()["rss"]
    if what == "step":
        xx = torch.cat([x, x]).requires_grad_(True)
        forward(xx)[:, 1].sum().backward()
    else:
        attribute(forward, x, torch.tensor([1]), "pcim", PcimOptions(steps=1))
    return {"chunk": chunk, "what": what, "tiles": grid.n_tiles, "peak_rss_mib_before": before,
            "peak_rss_mib": peak_memory_mib()["rss"]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
