"""Tiling: geometry and blend (property tests), and fields larger / smaller than the model in the worker."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import yaml
from cli_runner import run_pcim
from hypothesis import given, settings
from hypothesis import strategies as st
from plates import STORE_RTOL

from pcim_cli.engine import field as field_maps
from pcim_cli.engine import tiling
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.io import store
from pcim_cli.io.model import file_sha256, load_model
from pcim_cli.run import device, worker
from pcim_cli.run.task import FieldFiles, WellTask

TILE = 64
STEPS = 4

# --------------------------------------------------------------------------------------------------
# geometry and blend


@st.composite
def layouts(draw):
    tile_h = draw(st.integers(1, 48))
    tile_w = draw(st.integers(1, 48))
    h = draw(st.integers(tile_h, 200))
    w = draw(st.integers(tile_w, 200))
    oy = draw(st.integers(0, tile_h - 1))
    ox = draw(st.integers(0, tile_w - 1))
    return (h, w), (tile_h, tile_w), (oy, ox)


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_tiles_cover_every_pixel_and_blend_weights_sum_to_one(layout):
    field, tile, overlap = layout
    grid = tiling.plan_tiles(field, tile, overlap)
    cover = torch.zeros(field)
    total = torch.zeros(field, dtype=torch.float64)
    for i in range(grid.n_tiles):
        y0, x0 = grid.origin(i)
        assert 0 <= y0 <= field[0] - grid.tile[0] and 0 <= x0 <= field[1] - grid.tile[1]
        cover[y0 : y0 + grid.tile[0], x0 : x0 + grid.tile[1]] += 1
        weight = grid.weight(i)
        assert weight.shape == grid.tile and (weight > 0).all()
        total[y0 : y0 + grid.tile[0], x0 : x0 + grid.tile[1]] += weight.double()
    assert (cover >= 1).all()
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)
    for starts, size, t, o in ((grid.starts_y, field[0], grid.tile[0], overlap[0]),
                               (grid.starts_x, field[1], grid.tile[1], overlap[1])):
        assert starts[0] == 0 and starts[-1] == size - t
        assert all(b - a <= t - o for a, b in zip(starts, starts[1:], strict=False))  # overlap >= requested


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(1, 3))
def test_stitched_map_has_the_field_shape_and_keeps_a_constant(layout, m):
    field, tile, overlap = layout
    grid = tiling.plan_tiles(field, tile, overlap)
    out = tiling.stitch(grid, torch.full((grid.n_tiles, m, *grid.tile), 0.25))
    assert out.shape == (m, *field)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), rtol=0, atol=1e-6)


def test_stitching_the_tiles_of_a_field_gives_the_field_back():
    x = torch.rand(2, 150, 131)
    grid = tiling.plan_tiles((150, 131), (TILE, TILE))
    assert grid.overlap == (8, 8) and grid.n_tiles == grid.shape[0] * grid.shape[1] > 1
    torch.testing.assert_close(tiling.stitch(grid, tiling.cut(x, grid, range(grid.n_tiles))), x)


def test_a_field_of_the_tile_size_is_one_tile_with_weight_one():
    for tile in (None, (40, 50)):
        grid = tiling.plan_tiles((40, 50), tile)
        assert grid.n_tiles == 1 and grid.tile == (40, 50)
        assert torch.equal(grid.weight(0), torch.ones(40, 50))
    maps = torch.rand(1, 2, 40, 50)
    assert torch.equal(tiling.stitch(grid, maps), maps[0])


def test_a_field_smaller_than_the_tile_is_refused():
    with pytest.raises(tiling.TileSizeError, match="smaller"):
        tiling.plan_tiles((60, 100), (TILE, TILE))


# --------------------------------------------------------------------------------------------------
# the worker on fields larger / smaller than a fixed-size model


class FixedSizeNet(torch.nn.Module):
    """Needs exactly 3 x TILE x TILE inputs (a linear head on the flattened features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 5, stride=4, padding=2)
        self.head = torch.nn.Linear(4 * (TILE // 4) ** 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class OomAbove(torch.nn.Module):
    """Wraps a model; raises torch's out-of-memory error for batches larger than `limit`."""

    def __init__(self, inner: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit = inner, limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return self.inner(x)


@pytest.fixture(scope="module")
def fixed_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "fixed.ts"
    torch.jit.trace(FixedSizeNet().eval(), torch.rand(2, 3, TILE, TILE)).save(str(path))
    return path


def write_field(folder: Path, well: str, site: int, shape: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    files = []
    for c in (1, 2, 3):
        path = folder / f"{well}_s{site}_w{c}.tif"
        tifffile.imwrite(path, rng.integers(0, 4000, size=shape, dtype=np.uint16))
        files.append(str(path))
    return files


def make_task(tmp_path: Path, model: Path, shapes: list[tuple[int, int]], input_size, **kw) -> WellTask:
    images = tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    fields = tuple(FieldFiles(site=i + 1, index=i, files=tuple(write_field(images, "A01", i + 1, s, i)))
                   for i, s in enumerate(shapes))
    zarr_path = tmp_path / "out.zarr"
    store.create_plate(zarr_path, "P1", {"A01": len(fields)})
    engine = {"steps": STEPS, "resolution": 4, "seed": 0, **kw.pop("engine", {})}
    return WellTask(
        plate="P1", well="A01", fields=fields, channels=("a", "b", "c"), classes=("neg", "pos"),
        targets=kw.pop("targets", None), normalize={"method": "percentile", "low": 1.0, "high": 99.8},
        model_path=str(model), model_sha256=file_sha256(model), input_size=input_size,
        engine=dataclasses.asdict(PcimOptions(**engine)), store_path=str(zarr_path), fingerprint="test", **kw)


def test_a_field_of_the_model_size_gives_the_same_map_tiled_and_untiled(tmp_path, fixed_model):
    maps = []
    for input_size in (None, (TILE, TILE)):
        task = make_task(tmp_path / str(input_size), fixed_model, [(TILE, TILE)], input_size)
        rows = worker.explain_well(task)
        assert [r["status"] for r in rows] == ["done"]
        arr, _, record = store.read_field(Path(task.store_path), "A01", 0)
        assert {k: record["tiling"][k] for k in ("tile", "overlap", "n_tiles", "grid")} == {
            "tile": [TILE, TILE], "overlap": [0, 0], "n_tiles": 1, "grid": [1, 1]}
        maps.append(arr)
    assert np.array_equal(maps[0], maps[1])


def test_tiled_field_stats_are_tile_means_and_every_target_gets_a_map(tmp_path, fixed_model):
    task = make_task(tmp_path, fixed_model, [(150, 100)], (TILE, TILE), targets=("neg", "pos"), batch_size=4)
    rows = worker.explain_well(task)
    assert [(r["status"], r["target"]) for r in rows] == [("done", "neg"), ("done", "pos")]
    arr, labels, record = store.read_field(Path(task.store_path), "A01", 0)
    assert arr.shape == (2, 150, 100) and labels == ["neg", "pos"] and (arr >= 0).all()
    assert record["tiling"]["n_tiles"] == 6 and record["tiling"]["grid"] == [3, 2]
    probs = record["class_probabilities"]
    assert abs(probs["neg"] + probs["pos"] - 1) < 1e-5
    assert record["predicted_class"] == max(probs, key=probs.get)
    assert record["results"]["pos"]["steps"] == STEPS
    assert set(record["timings_s"]) >= {"read", "fit"} and record["peak_memory_mib"]["rss"] > 0


def test_a_field_smaller_than_the_model_fails_with_a_message_and_others_go_on(tmp_path, fixed_model):
    task = make_task(tmp_path, fixed_model, [(TILE - 10, 90), (TILE, 90)], (TILE, TILE))
    rows = worker.explain_well(task)
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert "smaller than" in rows[0]["error"] and "model.input_size" in rows[0]["error"]


class GlobalPoolNet(torch.nn.Module):
    """Fully convolutional: any field size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).amax(dim=(2, 3))


def test_untiled_fields_of_several_sizes_are_batched_by_size(tmp_path):
    path = tmp_path / "gp.ts"
    torch.jit.script(GlobalPoolNet().eval()).save(str(path))
    shapes = [(40, 40), (48, 36), (40, 40), (48, 36), (40, 40)]
    task = make_task(tmp_path, path, shapes, None, batch_size=2)
    rows = worker.explain_well(task)
    assert sorted(r["site"] for r in rows) == [1, 2, 3, 4, 5] and all(r["status"] == "done" for r in rows)
    for i, shape in enumerate(shapes):
        arr, _, record = store.read_field(Path(task.store_path), "A01", i)
        assert arr.shape == (1, *shape) and record["tiling"]["n_tiles"] == 1


def _with_model(monkeypatch, task: WellTask, module: torch.nn.Module) -> None:
    loaded = load_model(Path(task.model_path), 3, task.input_size)
    loaded.module = module
    monkeypatch.setitem(device.MODELS.items, device.model_key(task.model_sha256, 3, task.input_size, task.device),
                        loaded)


@pytest.mark.parametrize(("limit", "batch"), [(7, 3), (3, 1)])
def test_out_of_memory_halves_the_batch_and_gives_the_same_maps(tmp_path, fixed_model, monkeypatch, caplog,
                                                                 limit, batch):
    shape = [(150, 100)]  # 6 tiles
    ref_task = make_task(tmp_path / "ref", fixed_model, shape, (TILE, TILE), batch_size=16, fidelity=False,
                         tile_maps="per-tile")
    assert [r["status"] for r in worker.explain_well(ref_task)] == ["done"]
    reference, _, _ = store.read_field(Path(ref_task.store_path), "A01", 0)

    task = make_task(tmp_path / "oom", fixed_model, shape, (TILE, TILE), batch_size=16, fidelity=False,
                     tile_maps="per-tile")
    flaky = OomAbove(torch.jit.load(str(fixed_model)), limit=limit)  # a fit step sends 2 images per map
    _with_model(monkeypatch, task, flaky)
    with caplog.at_level(logging.WARNING, logger="pcim_cli.run.device"):
        rows = worker.explain_well(task)
    assert [r["status"] for r in rows] == ["done"]
    maps, _, record = store.read_field(Path(task.store_path), "A01", 0)
    np.testing.assert_allclose(maps, reference, rtol=STORE_RTOL, atol=1e-6)
    assert record["batch_size"] == batch
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "compute.batch_size" in warnings[0].getMessage()  # warned once


def _whole_field_reference(tmp_path: Path, model: Path, **kw) -> np.ndarray:
    task = make_task(tmp_path / "ref", model, [(150, 100)], (TILE, TILE), batch_size=16, **kw)
    assert [r["status"] for r in worker.explain_well(task)] == ["done"]  # 6 tiles x 2 images in one model call
    return store.read_field(Path(task.store_path), "A01", 0)[0]


def test_a_whole_field_goes_through_the_model_in_calls_of_twice_the_batch_size(tmp_path, fixed_model, monkeypatch):
    reference = _whole_field_reference(tmp_path, fixed_model, fidelity=True)
    task = make_task(tmp_path / "chunked", fixed_model, [(150, 100)], (TILE, TILE), batch_size=2, fidelity=True)
    small = OomAbove(torch.jit.load(str(fixed_model)), limit=4)  # a device that takes 4 tiles per call
    _with_model(monkeypatch, task, small)
    rows = worker.explain_well(task)
    assert [r["status"] for r in rows] == ["done"] and max(small.sizes) == 4  # 12 tiles per step, 4 per call
    maps, _, record = store.read_field(Path(task.store_path), "A01", 0)
    assert record["tiling"]["maps"] == "field"
    np.testing.assert_allclose(maps, reference, rtol=STORE_RTOL, atol=1e-6)  # checkpointed chunks: the same map


def test_out_of_memory_on_one_whole_field_retries_in_smaller_model_calls(tmp_path, fixed_model, monkeypatch):
    reference = _whole_field_reference(tmp_path, fixed_model, fidelity=False)
    task = make_task(tmp_path / "oom", fixed_model, [(150, 100)], (TILE, TILE), batch_size=16, fidelity=False)
    _with_model(monkeypatch, task, OomAbove(torch.jit.load(str(fixed_model)), limit=7))  # a step needs 12
    rows = worker.explain_well(task)
    assert [r["status"] for r in rows] == ["done"]
    maps, _, record = store.read_field(Path(task.store_path), "A01", 0)
    np.testing.assert_allclose(maps, reference, rtol=STORE_RTOL, atol=1e-6)
    assert record["batch_size"] == 3  # 6 tiles per call after one halving


def test_out_of_memory_on_one_whole_field_at_two_tiles_fails_it_naming_tile_maps(tmp_path, fixed_model, monkeypatch):
    task = make_task(tmp_path, fixed_model, [(150, 100)], (TILE, TILE), batch_size=16, fidelity=False)
    _with_model(monkeypatch, task, OomAbove(torch.jit.load(str(fixed_model)), limit=1))
    rows = worker.explain_well(task)
    assert [r["status"] for r in rows] == ["failed"]
    assert "out of memory" in rows[0]["error"] and "explain.tile_maps: per-tile" in rows[0]["error"]


def test_chunked_tiled_forward_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    model = torch.jit.script(net)
    grid = tiling.plan_tiles((150, 100), (TILE, TILE))
    x = torch.rand(2, 3, 150, 100)
    grads = []
    for chunk in (None, 5):
        xi = x.clone().requires_grad_(True)
        logits = field_maps.TiledForward(model, grid, "mean-prob", chunk=chunk)(xi)
        logits.log_softmax(-1)[:, 1].sum().backward()
        grads.append((logits.detach(), xi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="chunk"):
        field_maps.TiledForward(model, grid, chunk=0)


def test_out_of_memory_at_one_image_fails_the_field_naming_the_setting(tmp_path, fixed_model, monkeypatch):
    task = make_task(tmp_path, fixed_model, [(TILE, TILE)], (TILE, TILE), batch_size=4, fidelity=False)
    _with_model(monkeypatch, task, OomAbove(torch.jit.load(str(fixed_model)), limit=1))
    rows = worker.explain_well(task)
    assert [r["status"] for r in rows] == ["failed"]
    assert "out of memory" in rows[0]["error"] and "compute.batch_size: 4" in rows[0]["error"]


def test_out_of_memory_from_torchscript_is_recognised():
    @torch.jit.script
    def boom(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x

    with pytest.raises(Exception) as info:
        boom(torch.zeros(2))
    assert device.is_out_of_memory(info.value)
    assert not device.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


# --------------------------------------------------------------------------------------------------
# end to end through the console script



@pytest.mark.slow
def test_pcim_explain_writes_maps_of_the_field_shape_for_a_field_larger_than_the_model(tmp_path, fixed_model):
    images = tmp_path / "images"
    images.mkdir()
    write_field(images, "A01", 1, (300, 260))
    write_field(images, "B02", 1, (TILE, TILE), seed=1)
    config = {
        "plate": {"name": "BIG", "images": "images/", "pattern": "{well}_s{field}_w{channel}.tif",
                  "channels": {"a": "1", "b": "2", "c": "3"}},
        "model": {"path": str(fixed_model), "classes": ["neg", "pos"], "input_size": [TILE, TILE]},
        "explain": {"steps": STEPS},
        "compute": {"cluster": "none", "device": "cpu", "batch_size": 8},
        "output": {"zarr": "out/big.zarr", "csv": "out/big.csv"},
    }
    (tmp_path / "plate.yaml").write_text(yaml.safe_dump(config))
    proc = run_pcim("explain", str(tmp_path / "plate.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "out" / "big.csv")
    assert (df["PCIM_Status"] == "done").all() and len(df) == 2
    big, _, record = store.read_field(tmp_path / "out" / "big.zarr", "A01", 0)
    assert big.shape == (1, 300, 260) and (big >= 0).all() and big.max() > 0
    assert record["tiling"]["n_tiles"] == 30 and record["tiling"]["tile"] == [TILE, TILE]
    small, _, record = store.read_field(tmp_path / "out" / "big.zarr", "B02", 0)
    assert small.shape == (1, TILE, TILE) and record["tiling"]["n_tiles"] == 1
    # the shortcut QC's seam share: the tiled field has one, the one-tile field none (docs/shortcuts.md)
    seams = df.set_index("Metadata_Well")["PCIM_Share_Seams"]
    assert 0 <= seams["A01"] <= 1 and np.isnan(seams["B02"])
    assert record["qc"]["areas"]["seams"] is None
