"""bioimage.io model packages as model.path: packages built and validated by bioimageio.spec around the demo
classifier and a fixed-input (tiled) classifier; what pcim takes from them, what it refuses and why."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from bioimageio_factory import SCALE_RANGE_CLIP, build_package, reference_preprocess
from model_factory import DEMO_MODEL, make_model
from ome_zarr_factory import demo_fields

from pcim_cli.errors import ConfigError, ModelError
from pcim_cli.io import bioimageio, images, package_checks
from pcim_cli.io.model import file_sha256

pytest.importorskip("bioimageio.spec", reason="bioimageio.spec (test extra) reads the packages")
AXES = {"batch": "batch", "channel": "channel", "y": "space", "x": "space"}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PCIM_CACHE_DIR", str(tmp_path / "cache"))


def _jit(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "rdf.yaml"])
def test_demo_classifier_package(tmp_path: Path, as_zip: bool) -> None:
    path = build_package(tmp_path / "pkg", DEMO_MODEL, zip_name="demo.zip" if as_zip else None)
    pkg = bioimageio.load_package(path)
    assert pkg.weights_sha256 == file_sha256(DEMO_MODEL) == file_sha256(pkg.weights)
    where = tmp_path / "cache" / "bioimageio" / pkg.weights_sha256 if as_zip else tmp_path / "pkg"
    assert pkg.weights.parent == where
    assert pkg.channels == ["DNA", "PH3", "Actin"] and pkg.classes == ["negative", "mitotic"]
    assert pkg.input_size is None and pkg.size_rule == {"y": {"min": 32, "step": 16}, "x": {"min": 32, "step": 16}}
    assert pkg.normalize == {"method": "percentile", "low": 1.0, "high": 99.8, "clip": True}
    assert pkg.size_ok((128, 128)) and not pkg.size_ok((130, 128)) and pkg.largest_size((130, 100)) == (128, 96)
    assert package_checks.self_check(pkg, pkg.normalize, _jit(pkg.weights)) is None
    record = pkg.record()
    assert record["weights"] == "torchscript" and record["preprocessing"][0]["id"] == "scale_range"
    assert bioimageio.is_package(path) and not bioimageio.is_package(DEMO_MODEL)
    if not as_zip:
        assert bioimageio.is_package(path.parent)  # the package's folder


def test_fixed_size_package_tiles_the_fields(tmp_path: Path) -> None:
    weights = make_model("only-64", tmp_path / "only64.ts")
    pkg = bioimageio.load_package(build_package(tmp_path / "pkg", weights, size=64, test_size=64))
    assert pkg.input_size == (64, 64) and pkg.size_rule is None
    assert package_checks.self_check(pkg, pkg.normalize, _jit(pkg.weights)) is None
    resolved = package_checks.reconcile(pkg, channels=["DNA", "PH3", "Actin"], normalize=None, classes=None,
                                    input_size=None)
    assert resolved.problems == [] and resolved.input_size == (64, 64) and resolved.taken["input_size"] == "package"
    clash = package_checks.reconcile(pkg, channels=["DNA", "PH3", "Actin"], normalize=None, classes=None,
                                 input_size=(128, 128))
    assert clash.problems[0][0] == "model.input_size" and "takes inputs of 64 x 64 pixels" in clash.problems[0][1]


@pytest.mark.parametrize("ops, expected", [
    ([], {"method": "none"}),
    (SCALE_RANGE_CLIP[:1], {"method": "percentile", "low": 1.0, "high": 99.8, "clip": False}),
    ([{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["batch", "y", "x"], "eps": 1e-5}}],
     {"method": "zscore", "eps": 1e-5}),
    ([{"id": "fixed_zero_mean_unit_variance", "kwargs": {"axis": "channel", "mean": [100.0, 200.0, 50.0],
                                                         "std": [10.0, 40.0, 5.0]}}],
     {"method": "fixed", "min": [100.0, 200.0, 50.0], "max": [110.0, 240.0, 55.0], "clip": False}),
    ([{"id": "scale_linear", "kwargs": {"gain": 0.002, "offset": -0.5}}],
     {"method": "fixed", "min": 250.0, "max": 750.0, "clip": False}),
], ids=["none", "scale_range", "zero_mean_unit_variance", "fixed_zero_mean_unit_variance", "scale_linear"])
def test_preprocessing_maps_to_the_same_numbers(ops, expected) -> None:
    """What pcim's normalisation makes of a real field equals the bioimage.io operation written out."""
    norm, _ = bioimageio.map_preprocessing(ops, 3, AXES)
    assert set(norm) == set(expected)
    for key, value in expected.items():
        assert norm[key] == (value if isinstance(value, (str, bool)) else pytest.approx(value)), key
    field = demo_fields(["A01"])["A01"][1].astype(np.float32)
    settings = dict(norm)
    got = images.normalize(field, settings.pop("method"), **settings)
    want = reference_preprocess(field[None], ops)[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("ops, reason", [
    ([{"id": "scale_range", "kwargs": {"axes": ["channel", "y", "x"], "max_percentile": 99.0}}],
     "over all channels together"),
    ([{"id": "scale_range", "kwargs": {"max_percentile": 99.0}}], "over all channels together"),
    ([{"id": "binarize", "kwargs": {"threshold": 0.5}}], "binarize has no pcim equivalent"),
    ([{"id": "scale_range", "kwargs": {"axes": ["y", "x"]}}, {"id": "clip", "kwargs": {"min": 0.0, "max": 0.5}}],
     "scale_range -> clip has no pcim equivalent"),
    ([{"id": "scale_linear", "kwargs": {"axis": "channel", "gain": [1.0, 2.0]}}], "2 gain values for 3 channels"),
])
def test_preprocessing_pcim_cannot_reproduce_is_refused(ops, reason) -> None:
    with pytest.raises(bioimageio.PackageError, match=reason):
        bioimageio.map_preprocessing(ops, 3, AXES)


def test_one_channel_joint_statistics_are_per_channel() -> None:
    ops = [{"id": "scale_range", "kwargs": {"min_percentile": 2.0, "max_percentile": 98.0}}]
    assert bioimageio.map_preprocessing(ops, 1, {"batch": "batch", "c": "channel", "y": "space", "x": "space"})[0] \
        == {"method": "percentile", "low": 2.0, "high": 98.0, "clip": False}


def test_plate_yaml_disagreeing_with_the_package(tmp_path: Path) -> None:
    pkg = bioimageio.load_package(build_package(tmp_path / "pkg", DEMO_MODEL))
    mine = {"method": "percentile", "low": 0.5, "high": 99.5}

    def check(**kw):
        args = {"channels": ["DNA", "PH3", "Actin"], "normalize": None, "classes": None, "input_size": None, **kw}
        return package_checks.reconcile(pkg, **args)

    same = check(normalize={"method": "percentile", "low": 1, "high": 99.8}, classes=["negative", "mitotic"])
    assert same.problems == [] and same.normalize == pkg.normalize and same.taken["normalize"] == "package"
    other = check(normalize=mine)
    assert [p for p, _ in other.problems] == ["model.normalize"]
    assert "low: 0.5" in other.problems[0][1] and "low: 1.0" in other.problems[0][1]
    assert "model.override_package" in other.problems[0][1]
    won = check(normalize=mine, override=["normalize"])
    assert won.problems == [] and won.normalize == mine and won.taken["normalize"] == "plate.yaml (override)"
    order = check(channels=["PH3", "DNA", "Actin"])
    assert order.problems[0][0] == "plate.channels" and "another order" in order.problems[0][1]
    assert check(channels=["PH3", "DNA", "Actin"], override=["channels"]).problems == []
    count = check(channels=["DNA", "PH3"], override=["channels"])
    assert "takes 3 (DNA, PH3, Actin)" in count.problems[0][1]  # never overridable: the model needs 3
    classes = check(classes=["neg", "mit"])
    assert classes.problems[0][0] == "model.classes" and "negative, mitotic" in classes.problems[0][1]
    assert check(classes=["neg", "mit"], override=["classes"]).classes == ["neg", "mit"]
    assert check(input_size=(64, 64)).problems == []  # 32 + 2 * 16
    assert check(input_size=(60, 64)).problems[0][0] == "model.input_size"


def test_self_check_catches_a_package_tested_with_other_preprocessing(tmp_path: Path) -> None:
    """The rdf says scale_range 1..99.8 + clip, but the test output was made with 5..95: the package lies."""
    stated = SCALE_RANGE_CLIP
    made = [{"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 5.0, "max_percentile": 95.0}},
            SCALE_RANGE_CLIP[1]]
    pkg = bioimageio.load_package(build_package(tmp_path / "pkg", DEMO_MODEL, preprocessing=stated,
                                                expected_ops=made))
    problem = package_checks.self_check(pkg, pkg.normalize, _jit(pkg.weights))
    assert problem is not None and "differ from its test output" in problem


def test_state_dict_weights_are_refused_naming_torchscript(tmp_path: Path) -> None:
    arch = tmp_path / "arch.py"
    arch.write_text("import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                    "        self.fc = torch.nn.Linear(3, 2)\n\n    def forward(self, x):\n"
                    "        return self.fc(x.mean(dim=(2, 3)))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import arch as arch_module  # noqa: PLC0415
        torch.save(arch_module.Net().state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
    entry = {"pytorch_state_dict": {"source": "weights.pt", "pytorch_version": "2.13",
                                    "architecture": {"source": "arch.py", "callable": "Net"}}}
    path = build_package(tmp_path / "pkg", DEMO_MODEL, weights_entry=entry,
                         extra_files={"arch.py": arch, "weights.pt": tmp_path / "weights.pt"})
    with pytest.raises(bioimageio.PackageError, match="has pytorch_state_dict weights; pcim runs torchscript"):
        bioimageio.load_package(path)


def test_segmentation_output_is_refused(tmp_path: Path) -> None:
    axes = [{"type": "batch"}, {"type": "channel", "channel_names": ["negative", "mitotic"]},
            {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}},
            {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}}]
    seg = tmp_path / "seg.ts"

    class Seg(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Seg()).save(str(seg))
    path = build_package(tmp_path / "pkg", seg, output_axes=axes)
    with pytest.raises(bioimageio.PackageError, match="pcim explains classifiers"):
        bioimageio.load_package(path)


def test_changed_weights_are_refused(tmp_path: Path) -> None:
    path = build_package(tmp_path / "pkg", DEMO_MODEL, zip_name=None)
    with open(path.parent / "weights.ts", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="sha256 .* but the package states"):
        bioimageio.load_package(path)


def test_not_a_model_package(tmp_path: Path) -> None:
    bad = tmp_path / "rdf.yaml"
    bad.write_text("type: model\nformat_version: 0.5.4\nname: half a package\n")
    with pytest.raises(ModelError, match="not a valid bioimage.io description"):
        bioimageio.load_package(bad)
    with pytest.raises(ModelError, match="does not exist"):
        bioimageio.load_package(tmp_path / "missing.zip")
    (tmp_path / "cut.zip").write_bytes(b"PK\x03\x04 a download that stopped")
    with pytest.raises(ModelError, match="cut.zip is not a zip archive"):
        bioimageio.load_package(tmp_path / "cut.zip")


def test_without_bioimageio_spec_the_message_names_the_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'pcim-cli\[bioimageio\]'"):
        bioimageio.load_package(DEMO_MODEL.parent / "plate.yaml")


def test_new_normalize_keys_keep_old_fingerprints() -> None:
    """clip: true (the default) is not written out, so plates explained before the key existed are not redone."""
    from pcim_cli.config import ModelConfig

    assert ModelConfig(path="m.ts").normalize.model_dump() == {"method": "percentile", "low": 1.0, "high": 99.8}
    fixed = ModelConfig(path="m.ts", normalize={"method": "fixed", "min": 0, "max": 4095}).normalize
    assert fixed.model_dump() == {"method": "fixed", "min": 0.0, "max": 4095.0}
    unclipped = ModelConfig(path="m.ts", normalize={"method": "percentile", "clip": False}).normalize.model_dump()
    assert unclipped["clip"] is False
    with pytest.raises(ValueError, match=r"min \(30.0\) must be below max \(20.0\) \(channel 2\)"):
        ModelConfig(path="m.ts", normalize={"method": "fixed", "min": [0, 30], "max": [10, 20]})


def test_override_package_needs_a_package(tmp_path: Path) -> None:
    from plates import make_plate

    from pcim_cli.config import load_config
    from pcim_cli.run import model_package

    plate = make_plate(tmp_path, wells=(), model={"override_package": ["normalize"]})
    with pytest.raises(ConfigError, match="model.override_package .normalize. applies to bioimage.io model packages"):
        model_package.apply(load_config(plate))
