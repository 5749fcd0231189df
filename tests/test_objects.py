"""Per-object attribution, the parts: engine/objects.py on hand-made tensors and the real demo classifier,
label images read from real TIFF files (io/labels.py), label discovery and plate.objects in the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from plates import DEMO

from pcim_cli.config import load_config
from pcim_cli.engine import mixing, tiling
from pcim_cli.engine import objects as engine
from pcim_cli.errors import ConfigError
from pcim_cli.io import images
from pcim_cli.io import labels as label_io


def demo_field(name: str = "A01_s1") -> tuple[torch.Tensor, torch.Tensor]:
    """A real demo field (normalised as pcim does) and its nuclei label image."""
    img = np.stack([tifffile.imread(DEMO / "images" / f"{name}_w{c}.tif") for c in (1, 2, 3)]).astype(np.float32)
    labels = tifffile.imread(DEMO / "labels" / f"{name}_nuclei.tif").astype(np.int64)
    return torch.from_numpy(images.normalize(img)), torch.from_numpy(labels)


class CountingForward:
    """The real demo classifier, counting the forward passes and the images they carried."""

    def __init__(self) -> None:
        self.model = torch.jit.load(str(DEMO / "classifier.ts")).eval()
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return self.model(x)


# --------------------------------------------------------------------------------------------------
# measures


def test_measure_gives_hand_derived_sums_shares_ranks_and_centres() -> None:
    labels = torch.zeros(4, 6, dtype=torch.long)
    labels[0, 0:2] = 7  # object 7: 2 px at (y 0, x 0..1)
    labels[2:4, 3:6] = 3  # object 3: 6 px, rows 2-3, columns 3-5
    labels[3, 0] = 12  # object 12: 1 px, no attribution
    maps = torch.zeros(1, 2, 4, 6)  # one target, two channels
    maps[0, 0, 0, 0:2] = torch.tensor([1.0, 3.0])  # object 7: channel 0 holds 4
    maps[0, 1, 2:4, 3:6] = 2.0  # object 3: channel 1 holds 12
    maps[0, 0, 1, 5] = 4.0  # background: 4
    m = engine.measure(maps, labels)
    assert m.ids.tolist() == [3, 7, 12]
    assert m.area.tolist() == [6, 2, 1]
    assert m.center_x.tolist() == [4.0, 0.5, 0.0] and m.center_y.tolist() == [2.5, 0.0, 3.0]
    assert m.sum[0].tolist() == [12.0, 4.0, 0.0]
    assert m.mean[0].tolist() == [2.0, 2.0, 0.0]
    assert m.max[0].tolist() == [2.0, 3.0, 0.0]
    assert m.share[0].tolist() == pytest.approx([0.6, 0.2, 0.0])  # of the field's 20
    assert m.rank[0].tolist() == [1, 2, 3]
    assert m.channel_share[0, :, 0].tolist() == [0.0, 1.0] and m.channel_share[0, :, 1].tolist() == [1.0, 0.0]
    assert torch.isnan(m.channel_share[0, :, 2]).all()  # no attribution: no split


def test_a_shared_map_is_split_over_channels_by_what_deleting_changes() -> None:
    x = torch.tensor([[[1.0, 0.5]], [[0.0, 0.5]]])  # (C=2, 1, 2)
    deleted = torch.tensor([[[0.0, 0.5]], [[1.0, 0.5]]])
    maps = torch.tensor([[[[2.0, 6.0]]]])  # (T=1, M=1, 1, 2)
    split = engine.channel_attribution(maps, x, deleted)
    # pixel 0: |1-0| and |0-1| -> half each; pixel 1: deleting changes nothing -> equal parts
    assert split[0, :, 0, 0].tolist() == [1.0, 1.0] and split[0, :, 0, 1].tolist() == [3.0, 3.0]
    assert engine.channel_shares(split)[0].tolist() == pytest.approx([0.5, 0.5])
    per_channel = torch.rand(1, 2, 3, 3)
    assert engine.channel_attribution(per_channel, torch.rand(2, 3, 3), torch.rand(2, 3, 3)) is per_channel


def test_compact_numbers_objects_whatever_their_label_values() -> None:
    labels = torch.tensor([[0, 70000], [5, 70000]])
    ids, index = engine.compact(labels)
    assert ids.tolist() == [5, 70000] and index.tolist() == [0, 2, 1, 2]
    ids, index = engine.compact(torch.tensor([[4, 4], [9, 4]]))  # no background at all
    assert ids.tolist() == [4, 9] and index.tolist() == [1, 1, 2, 1]


# --------------------------------------------------------------------------------------------------
# deletion: batched, tiled, against the model called one image at a time


def _field_probs(model, x: torch.Tensor, grid: tiling.TileGrid) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(tiling.cut(x, grid, range(grid.n_tiles))), dim=1).mean(0)


def test_batched_deletion_equals_deleting_each_object_alone_in_few_forward_passes() -> None:
    x, labels = demo_field()
    deleted = mixing.substrate(x[None], "mean", 8.0)[0]
    ids = torch.unique(labels)[1:]
    deletions = [ids[i : i + 1] for i in range(len(ids))]
    forward = CountingForward()
    base, after = engine.deletion_probs(forward, x, labels, deletions, deleted, batch_size=16)
    assert forward.calls == 2  # the field once, then all 10 deletions in one batch of 16
    grid = tiling.plan_tiles((128, 128), None)
    assert torch.allclose(base, _field_probs(forward.model, x, grid), atol=1e-6)
    for d, ids_d in enumerate(deletions):
        gone = torch.where(torch.isin(labels, ids_d)[None], deleted, x)
        assert torch.allclose(after[d], _field_probs(forward.model, gone, grid), atol=1e-5)


def test_tiled_deletion_runs_only_the_touched_tiles_and_aggregates_like_the_field() -> None:
    x, labels = demo_field("A02_s1")
    grid = tiling.plan_tiles((128, 128), (48, 48))  # 3 x 3 tiles with overlap
    deleted = mixing.substrate(x[None], "blur", 8.0)[0]
    ids = torch.unique(labels)[1:]
    deletions = [ids[i : i + 1] for i in range(len(ids))] + [ids[:3]]
    touched = sum(len({i for i in range(grid.n_tiles)
                       if torch.isin(tiling.cut(labels[None], grid, [i])[0, 0], d).any()}) for d in deletions)
    forward = CountingForward()
    base, after = engine.deletion_probs(forward, x, labels, deletions, deleted, grid, batch_size=8)
    assert forward.images == grid.n_tiles + touched < grid.n_tiles * (1 + len(deletions))
    for d, ids_d in enumerate(deletions):  # delete in the whole field, run every tile, mean
        gone = torch.where(torch.isin(labels, ids_d)[None], deleted, x)
        assert torch.allclose(after[d], _field_probs(forward.model, gone, grid), atol=1e-5)
    assert torch.allclose(base, _field_probs(forward.model, x, grid), atol=1e-6)


def test_deletion_aggregates_the_tiles_as_the_field_prediction_is_aggregated() -> None:
    x, labels = demo_field("A01_s2")
    grid = tiling.plan_tiles((128, 128), (64, 64))
    deleted = mixing.substrate(x[None], "mean", 8.0)[0]
    model = torch.jit.load(str(DEMO / "classifier.ts")).eval()

    def max_prob(tile_logits: torch.Tensor) -> torch.Tensor:  # e.g. model.aggregate: max
        return torch.log_softmax(tile_logits, dim=-1).amax(0)

    ids = torch.unique(labels)[1:]
    _, after = engine.deletion_probs(model, x, labels, [ids[:1]], deleted, grid, aggregate=max_prob)
    gone = torch.where(torch.isin(labels, ids[:1])[None], deleted, x)
    with torch.no_grad():
        expected = torch.softmax(max_prob(model(tiling.cut(gone, grid, range(grid.n_tiles)))), dim=-1)
    assert torch.allclose(after[0], expected, atol=1e-6)
    assert not torch.allclose(after[0], _field_probs(model, gone, grid), atol=1e-3)  # not the mean


def test_hundreds_of_objects_cost_a_few_forward_batches() -> None:
    x, _ = demo_field()
    labels = (torch.arange(128)[:, None] // 8 * 16 + torch.arange(128)[None, :] // 8 + 1)  # 256 objects
    ids = torch.unique(labels)
    forward = CountingForward()
    _, after = engine.deletion_probs(forward, x, labels, [ids[i : i + 1] for i in range(len(ids))],
                                     torch.zeros_like(x), batch_size=64)
    assert after.shape == (256, 2) and forward.calls == 1 + 4


def test_top_objects_are_those_holding_most_attribution() -> None:
    sums = torch.tensor([[1.0, 5.0, 3.0], [9.0, 0.0, 1.0]])
    ids = torch.tensor([10, 20, 30])
    assert [t.tolist() for t in engine.top_objects(sums, ids, 2)] == [[20, 30], [10, 30]]
    assert [t.tolist() for t in engine.top_objects(sums, ids, 5)] == [[20, 30, 10], [10, 30, 20]]


# --------------------------------------------------------------------------------------------------
# label images on disk


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int32])
def test_label_images_of_every_integer_type_read_back(tmp_path: Path, dtype) -> None:
    arr = np.zeros((20, 30), dtype=dtype)
    arr[2:5, 3:9] = 7
    arr[10:12, 20:25] = np.iinfo(dtype).max if dtype != np.int32 else 100000
    path = tmp_path / "lab.tif"
    tifffile.imwrite(path, arr)
    got = label_io.read_labels(path, (20, 30), "Nuclei")
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, arr.astype(np.uint32))


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: None, r"missing: write the Nuclei label image again"),
    (lambda p: p.write_bytes(b""), r"empty \(0 bytes\)"),
    (lambda p: p.write_bytes(b"II*\x00garbage"), r"cannot read label image .*truncated or not a TIFF"),
    (lambda p: tifffile.imwrite(p, np.zeros((20, 30), np.float32)), r"pixel type float32.*whole numbers"),
    (lambda p: tifffile.imwrite(p, np.full((20, 30), -1, np.int16)), r"negative values"),
    (lambda p: tifffile.imwrite(p, np.zeros((3, 20, 30), np.uint16), photometric="minisblack"), r"one 2-D plane"),
    (lambda p: tifffile.imwrite(p, np.zeros((20, 31), np.uint16)), r"20x31 px but its field is 20x30.*segment"),
])
def test_bad_label_images_are_refused_naming_the_file_and_the_fix(tmp_path: Path, write, message) -> None:
    path = tmp_path / "A01_s1_nuclei.tif"
    write(path)
    with pytest.raises(label_io.LabelError, match=message) as info:
        label_io.read_labels(path, (20, 30), "Nuclei")
    assert str(path) in str(info.value)


def test_discovery_accepts_the_plate_pattern_tokens_and_spellings(tmp_path: Path) -> None:
    folder = tmp_path / "seg" / "A1"
    folder.mkdir(parents=True)
    for name in ("A1_s1_cp_masks.tif", "A1_s2_cp_masks.tif", "b03_s1_cp_masks.tif"):
        (folder.parent if name.startswith("b") else folder).joinpath(name).write_bytes(b"x")
    kinds = label_io.discover_labels("Cells", f"{tmp_path}/seg/*{{well}}_s{{field}}_cp_masks.tif")
    assert set(kinds.found) == {("B03", 1)}  # '*' does not cross folders
    kinds = label_io.discover_labels("Cells", f"{tmp_path}/seg/A1/{{row}}{{col}}_s{{field}}_cp_masks.tif")
    assert sorted(kinds.found) == [("A01", 1), ("A01", 2)]
    assert kinds.problem("A01", 1) is None
    problem = kinds.problem("A01", 3)
    assert "A01 site 3: no label image for plate.objects.Cells" in problem and "A01_s3_cp_masks.tif" in problem


def test_two_files_for_one_field_are_ambiguous(tmp_path: Path) -> None:
    for name in ("A01_s1_a.tif", "A01_s1_b.tif"):
        (tmp_path / name).write_bytes(b"x")
    kinds = label_io.discover_labels("Nuclei", f"{tmp_path}/{{well}}_s{{field}}_*.tif")
    assert "2 label images match plate.objects.Nuclei (A01_s1_a.tif, A01_s1_b.tif)" in kinds.problem("A01", 1)


# --------------------------------------------------------------------------------------------------
# plate.objects in plate.yaml


def _yaml(tmp_path: Path, objects) -> Path:
    config = {"plate": {"images": "images", "channels": ["DNA"], "objects": objects}, "model": {"path": "m.ts"}}
    path = tmp_path / "sub" / "plate.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_object_patterns_resolve_against_the_yaml_folder(tmp_path: Path) -> None:
    cfg = load_config(_yaml(tmp_path, {"Nuclei": "labels/{well}_s{field}.tif", "Cells": "/abs/{well}.tif"}))
    assert cfg.plate.objects == {"Nuclei": f"{tmp_path}/sub/labels/{{well}}_s{{field}}.tif",
                                 "Cells": "/abs/{well}.tif"}
    assert cfg.explain.top_objects == 3


@pytest.mark.parametrize(("objects", "message"), [
    ({"nuclei 2": "l/{well}.tif"}, r"plate\.objects: object name 'nuclei 2': use letters, digits and '_'"),
    ({"Nuclei": "l/{well}_w{channel}.tif"}, r"plate\.objects: Nuclei: a label image has no channels"),
    ({"Nuclei": "l/{field}.tif"}, r"plate\.objects: .*names no well"),
    ({"Nuclei": "l/{plate}_{well}.tif"}, r"plate\.objects: unknown placeholder \{plate\}"),
    ({}, r"plate\.objects: give a mapping object name -> label-image pattern"),
])
def test_bad_object_settings_are_reported_at_their_yaml_path(tmp_path: Path, objects, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_yaml(tmp_path, objects))


def test_object_deletions_are_predicted_like_the_field_for_every_model_aggregate() -> None:
    from pcim_cli.engine import field as field_maps
    from pcim_cli.run import objects as run_objects

    x, labels = demo_field("A01_s1")
    model = torch.jit.load(str(DEMO / "classifier.ts")).eval()
    grid = tiling.plan_tiles((128, 128), (64, 64))
    deleted = mixing.substrate(x[None], "mean", 8.0)[0]
    ids = torch.unique(labels)[1:]
    gone = torch.where(torch.isin(labels, ids[:2])[None], deleted, x)
    for how in field_maps.AGGREGATES:
        used_grid, aggregate = run_objects.prediction(grid, how)
        assert used_grid.n_tiles == (1 if how == "whole-field" else 9)
        base, after = engine.deletion_probs(model, x, labels, [ids[:2]], deleted, used_grid, aggregate=aggregate)
        field_model = field_maps.TiledForward(model, grid, how)  # what the worker predicts fields with
        with torch.no_grad():
            assert torch.allclose(base, torch.softmax(field_model(x[None]), 1)[0], atol=1e-5), how
            assert torch.allclose(after[0], torch.softmax(field_model(gone[None]), 1)[0], atol=1e-5), how
