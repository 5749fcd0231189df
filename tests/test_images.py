"""TIFF discovery, reading and normalisation, on real TIFF files written under tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from pcim_cli.config import NormalizeFixed
from pcim_cli.errors import ConfigError, InputDataError
from pcim_cli.io.images import FieldSource, discover_fields, normalize, read_field
from pcim_cli.io.patterns import compile_pattern

GUID = "{3F2504E0-4F89-11D3-9A0C-0305E82C3301}"
CHANNELS = {"DNA": "1", "PH3": "2", "Actin": "3"}


def plane(seed: int, shape: tuple[int, int] = (24, 32), dtype: type = np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, shape).astype(dtype)


@pytest.fixture
def guid_plate(tmp_path: Path) -> Path:
    """MetaXpress-like names with a GUID suffix; B03 field 2 lacks channel 2; stray files around."""
    folder = tmp_path / "images"
    folder.mkdir()
    for well in ("A01", "B03"):
        for field in (1, 2):
            for ch in (1, 2, 3):
                if (well, field, ch) == ("B03", 2, 2):
                    continue
                seed = 100 * ord(well[0]) + 10 * field + ch
                tifffile.imwrite(folder / f"{well}_s{field}_w{ch}{GUID}.tif", plane(seed))
    tifffile.imwrite(folder / f"A01_s1_w1{GUID}_thumb.jpg", plane(0))  # not a match
    tifffile.imwrite(folder / f"A01_s1_w4{GUID}.tif", plane(0))  # a channel the model does not use
    (folder / ".DS_Store").write_text("x")
    return folder


def test_discover_per_channel_files_with_guid(guid_plate: Path) -> None:
    fields, problems = discover_fields(guid_plate, "{well}_s{field}_w{channel}*.tif", CHANNELS)
    assert sorted(fields) == ["A01", "B03"]
    assert [f.field for f in fields["A01"]] == [1, 2]
    assert [f.field for f in fields["B03"]] == [1]  # field 2 is incomplete
    assert len(problems) == 1 and problems[0].startswith("B03 field 2: no file for channel PH3 (token 2); restore")
    assert (problems[0].well, problems[0].field) == ("B03", 2)  # so the run can report it as that field
    src = fields["A01"][1]
    assert [p.name for p in src.files] == [f"A01_s2_w{c}{GUID}.tif" for c in (1, 2, 3)]
    img = read_field(src, 3)
    assert img.dtype == np.float32 and img.shape == (3, 24, 32)
    for c, path in enumerate(src.files):
        np.testing.assert_array_equal(img[c], tifffile.imread(path).astype(np.float32))


def test_discover_channel_order_follows_config(guid_plate: Path) -> None:
    channels = {"Actin": "3", "DNA": "1"}
    fields, problems = discover_fields(guid_plate, "{well}_s{field}_w{channel}*.tif", channels)
    assert problems == []
    assert [p.name[:9] for p in fields["B03"][1].files] == ["B03_s2_w3", "B03_s2_w1"]


def test_discover_wells_subset_and_missing_well(guid_plate: Path) -> None:
    fields, problems = discover_fields(guid_plate, "{well}_s{field}_w{channel}*.tif", CHANNELS,
                                       wells=["b3", "H12"])
    assert list(fields) == ["B03"]
    assert any(p.startswith("B03 field 2: no file for channel PH3 (token 2)") for p in problems)
    missing = [p for p in problems if p.startswith("H12: no image file matches")]
    assert len(missing) == 1 and (missing[0].well, missing[0].field) == ("H12", None)


def test_discover_row_col_case_insensitive_and_no_field(tmp_path: Path) -> None:
    for name in ("B-3_DNA.TIF", "B-3_PH3.TIF", "aa-12_DNA.tif", "aa-12_PH3.tif"):
        tifffile.imwrite(tmp_path / name, plane(1))
    fields, problems = discover_fields(tmp_path, "{row}-{col}_{channel}.tif", {"DNA": "DNA", "PH3": "PH3"})
    assert problems == []
    assert list(fields) == ["B03", "AA12"]
    assert fields["B03"][0] == FieldSource("B03", 1, (tmp_path / "B-3_DNA.TIF", tmp_path / "B-3_PH3.TIF"))


def test_discover_in_subfolders(tmp_path: Path) -> None:
    for well in ("A01", "A02"):
        (tmp_path / well).mkdir()
        for ch in ("DNA", "PH3"):
            tifffile.imwrite(tmp_path / well / f"s1_{ch}.tif", plane(2))
    fields, problems = discover_fields(tmp_path, "{well}/s{field}_{channel}.tif", {"DNA": "DNA", "PH3": "PH3"})
    assert problems == [] and list(fields) == ["A01", "A02"]


def test_discover_ambiguous_files_and_bad_wells(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "A01_s1_a.tif", plane(1, (8, 8)))
    tifffile.imwrite(tmp_path / "A01_s1_b.tif", plane(1, (8, 8)))
    tifffile.imwrite(tmp_path / "Z99_s1_a.tif", plane(1, (8, 8)))
    tifffile.imwrite(tmp_path / "A02_s3_a.tif", plane(1, (8, 8)))
    fields, problems = discover_fields(tmp_path, "{well}_s{field}_*.tif", {"DNA": "DNA"})
    assert list(fields) == ["A02"] and fields["A02"][0].field == 3
    assert any("A01 field 1: 2 files (A01_s1_a.tif, A01_s1_b.tif)" in p for p in problems)
    assert any(p.startswith("Z99_s1_a.tif: well Z99") for p in problems)


def test_discover_nothing_matches_shows_examples(guid_plate: Path) -> None:
    fields, problems = discover_fields(guid_plate, "{well}_f{field}_c{channel}.tiff", CHANNELS)
    assert fields == {}
    assert len(problems) == 1
    assert "matches plate.pattern '{well}_f{field}_c{channel}.tiff'" in problems[0]
    assert "A01_s1_w1" in problems[0]


def test_discover_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="does not exist or is not a folder"):
        discover_fields(tmp_path / "nope", "{well}.tif", {"DNA": "DNA"})


@pytest.mark.parametrize(("pattern", "fragment"), [
    ("{well}_{site}.tif", "unknown placeholder {site}"),
    ("{well}_{well}.tif", "appears twice"),
    ("{row}_{field}.tif", "names no well"),
    ("{well}{row}{col}.tif", "one or the other"),
])
def test_bad_patterns(pattern: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        compile_pattern(pattern)


def test_pattern_regex_groups() -> None:
    regex = compile_pattern("{well}_s{field}_w{channel}*.tif", ["1", "12"])
    match = regex.fullmatch("C07_s10_w12{abc}.TIF")
    assert match and match.group("well") == "C07" and match.group("field") == "10"
    assert match.group("channel") == "12"
    assert regex.fullmatch("C07_s10_w3.tif") is None


# ---------------------------------------------------------------- stacks


def stack_source(path: Path) -> FieldSource:
    return FieldSource("A01", 1, (path,))


def test_multipage_stack(tmp_path: Path) -> None:
    data = np.stack([plane(i) for i in range(3)])
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tif:
        for page in data:
            tif.write(page, contiguous=False)  # one page per channel, as many tools write them
    np.testing.assert_array_equal(read_field(stack_source(path), 3), data.astype(np.float32))
    one_call = tmp_path / "stack2.tif"
    tifffile.imwrite(one_call, data.astype(np.uint8), photometric="minisblack")
    np.testing.assert_array_equal(read_field(stack_source(one_call), 3), data.astype(np.float32))


def test_ome_tiff_z_is_max_projected(tmp_path: Path) -> None:
    zcyx = np.stack([np.stack([plane(10 * z + c) for c in range(3)]) for z in range(4)])
    path = tmp_path / "A01.ome.tif"
    tifffile.imwrite(path, zcyx, metadata={"axes": "ZCYX"}, ome=True)
    np.testing.assert_array_equal(read_field(stack_source(path), 3), zcyx.max(axis=0).astype(np.float32))


def test_imagej_hyperstack_float32(tmp_path: Path) -> None:
    zcyx = np.random.default_rng(0).random((2, 2, 16, 20)).astype(np.float32)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, zcyx, imagej=True, metadata={"axes": "ZCYX"})
    np.testing.assert_array_equal(read_field(stack_source(path), 2), zcyx.max(axis=0))


def test_rgb_and_single_channel_files(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_field(stack_source(tmp_path / "rgb.tif"), 3),
                                  np.moveaxis(rgb, -1, 0).astype(np.float32))
    tifffile.imwrite(tmp_path / "one.tif", plane(3)[np.newaxis, np.newaxis])  # singleton dims squeeze
    assert read_field(stack_source(tmp_path / "one.tif"), 1).shape == (1, 24, 32)


# ---------------------------------------------------------------- bad inputs


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="missing") as info:
        read_field(stack_source(tmp_path / "gone.tif"), 1)
    assert "gone.tif" in str(info.value)
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(InputDataError, match=r"empty \(0 bytes\).*copy it again"):
        read_field(stack_source(tmp_path / "empty.tif"), 1)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, np.stack([plane(i, (64, 64)) for i in range(3)]), photometric="minisblack")
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputDataError, match="truncated or not a TIFF") as info:
        read_field(stack_source(cut), 3)
    assert "cut.tif" in str(info.value)


def test_not_a_tiff(tmp_path: Path) -> None:
    path = tmp_path / "A01_s1_w1.tif"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(InputDataError, match="A01_s1_w1.tif.*truncated or not a TIFF"):
        read_field(stack_source(path), 1)


def test_wrong_channel_count(tmp_path: Path) -> None:
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, np.stack([plane(i) for i in range(4)]), photometric="minisblack")
    with pytest.raises(InputDataError, match="holds 4 channel.*plate.channels lists 3"):
        read_field(stack_source(path), 3)


def test_stack_given_as_channel_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.stack([plane(i) for i in range(3)]), photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", plane(1))
    src = FieldSource("A01", 1, (tmp_path / "a.tif", tmp_path / "b.tif"))
    with pytest.raises(InputDataError, match=r"holds 3 planes.*remove \{channel\}"):
        read_field(src, 2)


def test_shape_mismatch_between_channels(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", plane(1, (24, 32)))
    tifffile.imwrite(tmp_path / "b.tif", plane(2, (32, 32)))
    src = FieldSource("B03", 2, (tmp_path / "a.tif", tmp_path / "b.tif"))
    with pytest.raises(InputDataError, match=r"B03 field 2: .*b.tif is 32x32 pixels but .*a.tif is 24x32"):
        read_field(src, 2)


def test_nan_pixels(tmp_path: Path) -> None:
    img = np.ones((8, 8), np.float32)
    img[2, 3] = np.nan
    img[4, 4] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", img)
    with pytest.raises(InputDataError, match="nan.tif has 2 NaN or infinite pixels"):
        read_field(stack_source(tmp_path / "nan.tif"), 1)


def test_time_series_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 8, 8), np.uint8), metadata={"axes": "TCYX"}, ome=True)
    with pytest.raises(InputDataError, match="time series"):
        read_field(stack_source(path), 3)


# ---------------------------------------------------------------- normalisation


def test_percentile_normalisation_per_channel() -> None:
    ramp = np.arange(1000, dtype=np.float32).reshape(1, 10, 100)
    img = np.concatenate([ramp, ramp * 10 + 5])
    out = normalize(img, "percentile", 1.0, 99.0)
    assert out.dtype == np.float32 and out.shape == img.shape
    for c in range(2):
        lo, hi = np.percentile(img[c], [1.0, 99.0])
        expected = np.clip((img[c] - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(out[c], expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0


def test_percentile_large_image_is_close_to_the_exact_percentiles() -> None:
    """A 2160 px field takes the fast (approximate) percentile path; its speed is a benchmark's
    (make bench: the fixed costs of a 2160 px field), not a wall-clock assert here."""
    img = np.random.default_rng(0).gamma(2.0, 300.0, (2, 2160, 2160)).astype(np.float32)
    out = normalize(img)
    lo, hi = np.percentile(img[0], [1.0, 99.8])
    exact = np.clip((img[0] - lo) / (hi - lo), 0, 1)
    assert np.abs(out[0] - exact).max() < 0.02


def test_fixed_none_and_constant_channels() -> None:
    img = np.array([[[0, 32768, 65535]], [[7, 7, 7]]], dtype=np.uint16)
    fixed = normalize(img, "fixed", vmin=0, vmax=65535)
    np.testing.assert_allclose(fixed[0, 0], [0, 0.5, 1], atol=1e-4)
    per_channel = normalize(img, "fixed", vmin=[0, 0], vmax=[65535, 14])
    np.testing.assert_allclose(per_channel[1, 0], [0.5, 0.5, 0.5])
    assert normalize(img, "percentile")[1].tolist() == [[0.0, 0.0, 0.0]]  # constant channel
    raw = normalize(img, "none")
    assert raw.dtype == np.float32 and raw.tolist() == img.astype(np.float32).tolist()
    settings = NormalizeFixed(min=0, max=65535).model_dump()  # as the worker passes model.normalize
    np.testing.assert_array_equal(normalize(img, **settings), fixed)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(img, "minmax")
    z = normalize(img, "zscore", eps=0.0)  # a bioimage.io package's zero_mean_unit_variance
    x = img[0, 0].astype(np.float64)
    np.testing.assert_allclose(z[0, 0], (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-6)
    assert normalize(img, "zscore")[1].tolist() == [[0.0, 0.0, 0.0]]  # constant channel
    unclipped = normalize(img, "fixed", vmin=0, vmax=32767.5, clip=False)  # scale_range without a clip
    np.testing.assert_allclose(unclipped[0, 0], [0, 1, 2], atol=1e-4)
    with pytest.raises(ValueError, match="needs vmin and vmax"):
        normalize(img, "fixed")
