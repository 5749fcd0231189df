"""Model loading on tiny real TorchScript and torch.export files written under tmp_path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pcim_cli.errors import ModelError
from pcim_cli.io.model import LoadedModel, check_classes, file_sha256, load_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class TinyNet(torch.nn.Module):
    """conv -> relu -> global mean -> linear: any H, W; `channels` inputs, `classes` logits."""

    def __init__(self, channels: int = 3, classes: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class FixedSizeNet(torch.nn.Module):
    """A flatten head: only accepts 3 x 16 x 16 inputs."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class FeatureNet(torch.nn.Module):
    """Returns per-pixel maps, not logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture
def scripted(tmp_path: Path) -> Path:
    path = tmp_path / "classifier.ts"
    torch.jit.script(TinyNet().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "classifier.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=8, max=4096)
    width = torch.export.Dim("width", min=8, max=4096)
    program = torch.export.export(TinyNet().eval(), (torch.zeros(2, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: batch, 2: height, 3: width}})
    torch.export.save(program, str(path))
    return path


def test_torchscript_loads_and_matches_eager(scripted: Path) -> None:
    loaded = load_model(scripted, n_channels=3, input_size=None)
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "torchscript" and loaded.n_classes == 2 and loaded.path == scripted
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert not loaded.module.training
    x = torch.rand(3, 3, 20, 24)
    torch.testing.assert_close(loaded.module(x), TinyNet().eval()(x))


def test_input_gradient_still_flows(scripted: Path) -> None:
    loaded = load_model(scripted, n_channels=3, input_size=(16, 16))
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    loaded.module(x)[0, 1].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_export_archive_loads(exported: Path) -> None:
    loaded = load_model(exported, n_channels=3, input_size=(48, 40))
    assert loaded.kind == "export" and loaded.n_classes == 2
    x = torch.rand(5, 3, 48, 40)
    torch.testing.assert_close(loaded.module(x), TinyNet().eval()(x))


def test_sha256_matches_hashlib(scripted: Path) -> None:
    expected = hashlib.sha256(scripted.read_bytes()).hexdigest()
    assert file_sha256(scripted) == expected
    assert file_sha256(scripted, chunk_size=7) == expected
    assert load_model(scripted, 3, None).sha256 == expected


def test_wrong_channel_count_torchscript(scripted: Path) -> None:
    with pytest.raises(ModelError) as info:
        load_model(scripted, n_channels=4, input_size=None)
    message = str(info.value)
    assert str(scripted) in message
    assert "2 x 4 x 64 x 64 input" in message and "(batch, classes) logits" in message
    assert "to have 3 channels, but got 4 channels" in message  # the cause, not TorchScript's traceback
    assert "the model takes 3 input channels but plate.channels lists 4" in message
    assert "Traceback" not in message


def test_wrong_channel_count_export(exported: Path) -> None:
    with pytest.raises(ModelError, match="takes 3 input channels but plate.channels lists 2") as info:
        load_model(exported, n_channels=2, input_size=None)
    assert str(exported) in str(info.value)


def test_fixed_size_model_needs_input_size(tmp_path: Path) -> None:
    path = tmp_path / "fixed.pt"
    torch.jit.script(FixedSizeNet()).save(str(path))
    with pytest.raises(ModelError, match=r"2 x 3 x 64 x 64 input.*set model.input_size"):
        load_model(path, 3, None)
    assert load_model(path, 3, (16, 16)).n_classes == 2


def test_output_must_be_batch_by_classes(tmp_path: Path) -> None:
    path = tmp_path / "features.ts"
    torch.jit.script(FeatureNet()).save(str(path))
    with pytest.raises(ModelError, match=r"returned a torch.float32 tensor of shape \(2, 3, 64, 64\)"):
        load_model(path, 3, None)


def test_missing_and_corrupt_files(tmp_path: Path, scripted: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.ts", 3, None)
    garbage = tmp_path / "garbage.ts"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"cannot load model .*garbage.ts .*torch.jit.script"):
        load_model(garbage, 3, None)
    truncated = tmp_path / "cut.pt2"
    truncated.write_bytes(scripted.read_bytes()[:200])
    with pytest.raises(ModelError, match="cannot load model .*cut.pt2"):
        load_model(truncated, 3, None)
    state_dict = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), state_dict)
    with pytest.raises(ModelError, match="weights.pt.*must be TorchScript"):
        load_model(state_dict, 3, None)


def test_check_classes(scripted: Path) -> None:
    loaded = load_model(scripted, 3, None)
    assert check_classes(loaded, None) == ["0", "1"]
    assert check_classes(loaded, ["negative", "mitotic"]) == ["negative", "mitotic"]
    with pytest.raises(ModelError, match=r"lists 3 names \(a, b, c\) but model .* outputs 2 logits"):
        check_classes(loaded, ["a", "b", "c"])
