"""`pcim explain` on the bundled demo plate, through the installed console script, read back and scored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from cli_runner import run_pcim
from plates import DEMO

from pcim_cli.engine import baselines, metrics
from pcim_cli.io import images, store, summary


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    """One run of the demo plate with its shipped plate.yaml (default engine settings), from another cwd."""
    out = tmp_path_factory.mktemp("demo")
    proc = run_pcim("explain", str(DEMO / "plate.yaml"), "--set", f"output.zarr={out}/demo.zarr",
                    "--set", f"output.csv={out}/demo.csv", cwd=out, timeout=1200)
    return {"proc": proc, "store": out / "demo.zarr", "csv": out / "demo.csv"}


def field_image(well: str, site: int) -> torch.Tensor:
    img = np.stack([tifffile.imread(DEMO / "images" / f"{well}_s{site}_w{c}.tif") for c in (1, 2, 3)])
    return torch.from_numpy(images.normalize(img.astype(np.float32)))


@pytest.mark.slow
def test_demo_exits_zero_and_writes_one_csv_row_per_field(demo_run):
    proc = demo_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(demo_run["csv"])
    assert len(df) == 48  # 24 wells x 2 fields, target: predicted
    fixed = list(summary.COLUMNS)
    assert [c for c in df.columns if c in fixed] == fixed
    assert {"Metadata_treatment", "Metadata_expected_class"} <= set(df.columns)
    assert (df["PCIM_Status"] == "done").all()
    assert df.groupby(["Metadata_Well", "Metadata_Site"]).size().eq(1).all()
    assert df["Metadata_Plate"].eq("DEMO01").all()
    assert df["PCIM_ProbOriginal"].between(0, 1).all() and df["PCIM_DeletionAUC"].between(0, 1).all()
    # the model reads the demo correctly: the predicted class is the plate map's expected class
    assert (df["PCIM_PredictedClass"] == df["Metadata_expected_class"]).mean() >= 0.9


@pytest.mark.slow
def test_demo_store_holds_one_map_per_field_with_the_field_shape(demo_run):
    df = pd.read_csv(demo_run["csv"])
    for row in df.itertuples():
        index = int(row.PCIM_ZarrPath.rsplit("/", 1)[1])
        maps, labels, record = store.read_field(demo_run["store"], row.Metadata_Well, index)
        assert maps.shape == (1, 128, 128)
        assert labels == [row.PCIM_Target]
        assert (maps >= 0).all() and maps.max() > 0
        assert record["status"] == "done" and record["site"] == row.Metadata_Site
        assert record["settings"]["normalize"] == {"method": "percentile", "low": 1.0, "high": 99.8}
        assert record["settings"]["engine"]["budget"] == 0.02 and len(record["fingerprint"]) == 64
        assert record["results"][row.PCIM_Target]["prob_original"] == pytest.approx(row.PCIM_ProbOriginal)


@pytest.mark.slow
def test_demo_maps_find_the_true_object_and_beat_random_on_deletion(demo_run):
    import torch.jit

    df = pd.read_csv(demo_run["csv"])
    pos = df[df["PCIM_Target"] == "mitotic"]
    xs, maps, masks = [], [], []
    for row in pos.itertuples():
        mask = tifffile.imread(DEMO / "masks" / f"{row.Metadata_Well}_s{row.Metadata_Site}.tif") > 0
        if not mask.any():
            continue
        index = int(row.PCIM_ZarrPath.rsplit("/", 1)[1])
        xs.append(field_image(row.Metadata_Well, row.Metadata_Site))
        maps.append(torch.from_numpy(store.read_field(demo_run["store"], row.Metadata_Well, index)[0]))
        masks.append(torch.from_numpy(mask))
    assert len(xs) >= 16
    x, m, mask = torch.stack(xs), torch.stack(maps), torch.stack(masks)
    # pointing game with a 3 px tolerance (TorchRay uses 15 px at 224 px): the masks are the nuclei
    # dilated by 1 px, while the stain's blur, which the model sees, reaches 2-3 px further
    pointing = metrics.pointing_game(m, mask, tolerance=3)
    assert float(pointing.mean()) >= 0.9, pointing
    assert float(metrics.relevance_mass(m, mask).mean()) > 0.5
    model = torch.jit.load(str(DEMO / "classifier.ts")).eval()
    target = torch.ones(len(x), dtype=torch.long)
    fine = torch.linspace(0, 0.2, 41)
    ours = metrics.deletion_auc(model, x, m, target, fractions=fine)
    rand = metrics.deletion_auc(model, x, baselines.random_map(model, x, target), target, fractions=fine)
    assert float(ours.mean()) < 0.5 * float(rand.mean()), (ours.mean(), rand.mean())


@pytest.mark.slow
def test_relative_paths_resolve_against_the_yaml_not_the_cwd(tmp_path):
    plate = tmp_path / "plate"
    shutil.copytree(DEMO, plate, ignore=shutil.ignore_patterns("out", "*.py"))
    proc = run_pcim("explain", str(plate / "plate.yaml"), "--set", "plate.wells=[A01]",
                    "--set", "explain.steps=5", cwd=Path("/"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (plate / "out" / "DEMO01.zarr").is_dir() and (plate / "out" / "DEMO01_pcim.csv").is_file()
    assert "\x1b[" not in proc.stderr  # no colour or progress control sequences off a terminal


@pytest.mark.slow
def test_a_model_with_the_wrong_channel_count_is_refused_naming_the_file(tmp_path):
    class TwoChannel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).amax(dim=(2, 3))

    bad = tmp_path / "two_channel.ts"
    torch.jit.script(TwoChannel()).save(str(bad))
    proc = run_pcim("explain", str(DEMO / "plate.yaml"), "--set", f"model.path={bad}",
                    "--set", f"output.zarr={tmp_path}/o.zarr", "--set", f"output.csv={tmp_path}/o.csv")
    assert proc.returncode == 78, proc.stderr
    assert str(bad) in proc.stderr and "3" in proc.stderr
    assert not (tmp_path / "o.csv").exists()


def test_a_wrong_yaml_key_gets_exit_78_with_its_path(tmp_path):
    text = (DEMO / "plate.yaml").read_text().replace("  steps:", "  stpes:")
    cfg = tmp_path / "plate.yaml"
    cfg.write_text(text.replace("images: images/", f"images: {DEMO / 'images'}"))
    proc = run_pcim("explain", str(cfg))
    assert proc.returncode == 78
    assert "explain.stpes" in proc.stderr and "steps" in proc.stderr


@pytest.mark.slow
def test_a_torch_export_archive_explains_the_demo_like_its_torchscript_twin(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo", DEMO / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    scripted = torch.jit.load(str(DEMO / "classifier.ts"))
    net = make_demo.DemoNet().eval()
    net.load_state_dict(scripted.state_dict())
    archive = tmp_path / "classifier.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)  # fixed 128x128 fields, any batch size
    program = torch.export.export(net, (torch.zeros(2, 3, 128, 128),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(archive))

    results = {}
    for name, path in (("ts", DEMO / "classifier.ts"), ("pt2", archive)):
        proc = run_pcim("explain", str(DEMO / "plate.yaml"), "--set", f"model.path={path}",
                        "--set", "plate.wells=[A01]", "--set", "explain.steps=20",
                        "--set", "model.input_size=[128,128]",
                        "--set", f"output.zarr={tmp_path}/{name}.zarr", "--set", f"output.csv={tmp_path}/{name}.csv")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = store.read_field(tmp_path / f"{name}.zarr", "A01", 0)
    assert results["pt2"][2]["model_sha256"] != results["ts"][2]["model_sha256"]
    np.testing.assert_allclose(results["pt2"][0], results["ts"][0], rtol=1e-3, atol=1e-4)


def test_an_unknown_method_is_refused_not_silently_replaced(tmp_path):
    proc = run_pcim("explain", str(DEMO / "plate.yaml"), "--set", "explain.method=gradcam",
                    "--set", f"output.zarr={tmp_path}/o.zarr", "--set", f"output.csv={tmp_path}/o.csv")
    assert proc.returncode == 78
    assert "explain.method" in proc.stderr and "gradcam" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.slow
def test_a_bad_layout_target_fails_that_well_only_and_exits_3(tmp_path):
    plate = tmp_path / "plate"
    shutil.copytree(DEMO, plate, ignore=shutil.ignore_patterns("out", "*.py"))
    layout = plate / "layout.csv"
    layout.write_text(layout.read_text().replace("A01,nocodazole,0.3,mitotic", "A01,nocodazole,0.3,mitotc"))
    proc = run_pcim("explain", str(plate / "plate.yaml"), "--set", "explain.target=layout:expected_class",
                    "--set", "plate.wells=[A01,A02]", "--set", "explain.steps=5")
    assert proc.returncode == 3, proc.stderr[-2000:]
    df = pd.read_csv(plate / "out" / "DEMO01_pcim.csv").set_index(["Metadata_Well", "Metadata_Site"])
    assert len(df) == 4
    assert (df.loc["A01", "PCIM_Status"] == "failed").all()
    assert df.loc["A01", "PCIM_Error"].str.contains("mitotc").all()
    assert (df.loc["A02", "PCIM_Status"] == "done").all() and (df.loc["A02", "PCIM_Target"] == "mitotic").all()
    assert store.read_record(plate / "out" / "DEMO01.zarr", "A02", 0)["status"] == "done"


@pytest.mark.slow
def test_demo_writes_the_nuclei_table_and_the_mitotic_nuclei_rank_first(demo_run):
    """`make demo` writes DEMO01_pcim_Nuclei.csv (plate.objects.Nuclei of the shipped plate.yaml); in mitotic
    fields the PH3-positive nuclei hold the top ranks (object AUROC of the share, README figure)."""
    from pcim_cli.engine import object_ranking

    table = pd.read_csv(demo_run["csv"].parent / "DEMO01_pcim_Nuclei.csv")
    main = pd.read_csv(demo_run["csv"])
    aurocs = []
    for row in main.itertuples():
        labels = tifffile.imread(DEMO / "labels" / f"{row.Metadata_Well}_s{row.Metadata_Site}_nuclei.tif")
        rows = table[(table.Metadata_Well == row.Metadata_Well) & (table.Metadata_Site == row.Metadata_Site)]
        assert sorted(rows.ObjectNumber) == np.unique(labels)[1:].tolist()
        assert row.PCIM_Nuclei_Count == len(rows)
        if row.PCIM_Target != "mitotic":
            continue
        mask = tifffile.imread(DEMO / "masks" / f"{row.Metadata_Well}_s{row.Metadata_Site}.tif") > 0
        ids, positive = object_ranking.positives(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(mask))
        share = rows.set_index("ObjectNumber").loc[ids.tolist(), "PCIM_mitotic_Share"].to_numpy()
        aurocs.append(object_ranking.auroc(torch.from_numpy(share), positive))
    aurocs = [a for a in aurocs if a == a]
    assert len(aurocs) >= 16 and np.mean(aurocs) >= 0.98, aurocs
