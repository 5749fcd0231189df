"""Load the classifier (TorchScript or torch.export archive), check it on a probe batch, hash it.

The loaded module is frozen (no parameter gradients) and is only ever called forward, and
differentiated with respect to its input: x (B, C, H, W) float32 -> logits (B, K).
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pcim_cli.errors import ModelError

logger = logging.getLogger(__name__)

PROBE_BATCH = 2
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception)): (.+)$")
_CHANNEL_HINTS = (
    re.compile(r"to have (\d+) channels, but got (\d+) channels"),  # conv layers
    re.compile(r"size\(\)\[1\] == (\d+)"),  # torch.export shape guards
)


@dataclass
class LoadedModel:
    """A frozen classifier ready to call: `module(x)` with x (B, C, H, W) float32 gives (B, K) logits."""

    path: Path
    sha256: str
    kind: str  # "torchscript" | "export"
    module: torch.nn.Module
    n_classes: int
    device: str = "cpu"


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def error_summary(exc: BaseException) -> str:
    """The informative line of an error: TorchScript puts its cause last, after a code traceback."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return match.group(1).strip()
    return lines[0].strip()


def _channel_hint(message: str, n_channels: int) -> str:
    for pattern in _CHANNEL_HINTS:
        match = pattern.search(message)
        if match and int(match.group(1)) != n_channels:
            return (f"; the model takes {match.group(1)} input channels but plate.channels lists "
                    f"{n_channels}: list the channels the model was trained on, in order")
    return ""


def _load_module(path: Path, device: str) -> tuple[torch.nn.Module, str]:
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
        return module.to(device), "export"
    with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; TorchScript is still our input format
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
        return torch.jit.load(str(path), map_location=device), "torchscript"


def load_model(
    path: str | Path,
    n_channels: int,
    input_size: tuple[int, int] | None,
    device: str = "cpu",
    probe_size: tuple[int, int] = (64, 64),
    sha256: str | None = None,
) -> LoadedModel:
    """Load a TorchScript file (.ts, .pt, …) or a torch.export archive (.pt2) and check it.

    The model is called once on a fixed pseudo-random image in [0, 1) of shape 2 x n_channels x
    (input_size or probe_size) (not zeros: a model that standardises each image would divide by zero);
    it must return a float tensor of shape (2, K) of finite logits. Raises ModelError naming the file,
    what was expected and what came back, for a missing or unreadable file and for a model that does not
    fit. `sha256`: the file's digest when the caller has it (run/device.py's cache), else computed here.
    """
    path = Path(path)
    device = resolve_device(device)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist or is not a file: fix model.path")
    sha = sha256 or file_sha256(path)
    try:
        module, kind = _load_module(path, device)
    except Exception as exc:  # torch raises RuntimeError, BadZipFile, pickling errors, …
        raise ModelError(
            f"cannot load model {path} ({error_summary(exc)}); it must be TorchScript "
            "(torch.jit.script(model).save(path)) or a torch.export archive saved with torch.export.save "
            "to a .pt2 file"
        ) from exc
    try:
        module.eval()
    except NotImplementedError:  # exported programs keep the mode they were exported in
        pass
    for param in module.parameters():
        param.requires_grad_(False)

    h, w = input_size or probe_size
    shape = (PROBE_BATCH, n_channels, h, w)
    expected = f"a {' x '.join(map(str, shape))} input (batch x channels x H x W) giving (batch, classes) logits"
    try:
        with torch.no_grad():
            probe = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
            out = module(probe.to(device))
    except Exception as exc:
        message = error_summary(exc)
        hint = _channel_hint(message, n_channels)
        if not hint and input_size is None:
            hint = "; if the model needs a fixed input size, set model.input_size: [H, W]"
        raise ModelError(f"model {path} does not accept {expected}: it raised \"{message}\"{hint}") from exc
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model {path} returned {type(out).__name__} for {expected}; "
                         "it must return one tensor of logits")
    if out.ndim != 2 or out.shape[0] != PROBE_BATCH or not out.is_floating_point():
        raise ModelError(f"model {path} returned a {out.dtype} tensor of shape {tuple(out.shape)} for {expected}")
    if not torch.isfinite(out).all():
        raise ModelError(f"model {path} returned non-finite logits (NaN or infinite) for {expected} of "
                         "pseudo-random pixels in [0, 1); it cannot score any field: check the export (e.g. "
                         "weights saved after a diverged training run)")
    n_classes = int(out.shape[1])
    logger.info("loaded %s model %s (sha256 %s…, %d classes) on %s", kind, path, sha[:12], n_classes, device)
    return LoadedModel(path=path, sha256=sha, kind=kind, module=module, n_classes=n_classes, device=device)


def check_classes(loaded: LoadedModel, classes: Sequence[str] | None) -> list[str]:
    """The class names: `classes`, or "0", "1", … when None; ModelError if their count is wrong."""
    if classes is None:
        return [str(i) for i in range(loaded.n_classes)]
    if len(classes) != loaded.n_classes:
        raise ModelError(
            f"model.classes lists {len(classes)} names ({', '.join(classes)}) but model {loaded.path} "
            f"outputs {loaded.n_classes} logits; list {loaded.n_classes} class names in output order"
        )
    return list(classes)
