"""The explainer file `pcim train-explainer` writes: TorchScript with what it was trained for inside.

`explainer.pt` is a TorchScript archive of engine.explainer.Explainer; the archive itself holds the
metadata (`pcim_explainer.json`: classifier sha256, channels, normalisation, input size, classes, the
engine settings of its objective, training and validation objective, plates and wells, pcim version),
so the file cannot be separated from it; `explainer.pt.json` beside it is the same document for
people and tools, with the sha256 of the archive. `check_explainer` refuses an explainer made for
another classifier, other channels, another normalisation or another objective (ConfigError, exit 78,
naming both values and the fix).

Integrity: an explainer whose bytes changed after pcim wrote it is refused when it is loaded (exit 78,
naming the file), by `pcim explain`, its workers and `pcim validate`: the archive's CRCs must hold, the
weights must have the digest recorded inside the archive (`weights_sha256`, over every parameter and
buffer), and the file must have the sha256 its sidecar records (when the sidecar beside it belongs to
this explainer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcim_cli.engine.options import OBJECTIVE_KEYS
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.errors import ConfigError, OutputError
from pcim_cli.io.model import error_summary, file_sha256

logger = logging.getLogger(__name__)

META_NAME = "pcim_explainer.json"
FORMAT = "pcim-explainer/1"


def sidecar_path(path: str | Path) -> Path:
    """explainer.pt -> explainer.pt.json"""
    path = Path(path)
    return path.with_name(path.name + ".json")


@dataclass
class LoadedExplainer:
    """An explainer ready to call: module(x) (B, C, H, W) -> logits (B, K * M, h, w)."""

    path: Path
    sha256: str
    module: torch.nn.Module
    meta: dict[str, Any]


def save_explainer(module: torch.nn.Module, path: str | Path, meta: dict[str, Any]) -> str:
    """Script `module`, write it with `meta` inside (atomically) and the JSON sidecar; returns the sha256."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; it is still our model format
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit\.")
            scripted = torch.jit.script(module.eval())
            meta = finite({"format": FORMAT, **meta, "weights_sha256": weights_digest(scripted)})
            text = json.dumps(meta, indent=1, default=str, allow_nan=False)
            torch.jit.save(scripted, str(tmp), _extra_files={META_NAME: text})
        os.replace(tmp, path)
        sha = file_sha256(path)
        side = sidecar_path(path)
        side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        side_tmp.write_text(json.dumps({**meta, "sha256": sha}, indent=1, default=str, allow_nan=False) + "\n",
                            encoding="utf-8")
        os.replace(side_tmp, side)
    except OSError as exc:
        raise OutputError(f"cannot write the explainer {path}: {exc}; choose a writable --out") from None
    finally:  # also when stopped by a signal mid-write
        tmp.unlink(missing_ok=True)
    return sha


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float as None (strict JSON: a sidecar any reader can parse)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer of `module`: names, types, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _altered(path: Path, detail: str, hint: str) -> ConfigError:
    return ConfigError(f"explain.explainer: {path} was altered after pcim train-explainer wrote it ({detail}); "
                       "its maps would not be the trained explainer's: restore the file from a copy, or train it "
                       f"again (pcim train-explainer {hint} --out {path} --fresh)")


def _check_archive(path: Path, hint: str) -> None:
    """Every member of the archive matches its CRC (a flipped byte in the code or the weights).

    A file that does not even begin as a zip archive was never an explainer (a wrong path); one that
    begins as one but cannot be read was damaged after it was written."""
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ConfigError(f"explain.explainer: {path} is not a pcim explainer (not a TorchScript archive); "
                              f"write one with `pcim train-explainer {hint} --out {path}`")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _altered(path, f"its archive is damaged: {exc}", hint) from None
    if bad is not None:
        raise _altered(path, f"the member {bad} does not match its checksum", hint)


def _check_integrity(loaded: LoadedExplainer, hint: str) -> None:
    """The weights' digest recorded inside, and the sha256 of a sidecar that belongs to this explainer."""
    path, meta = loaded.path, loaded.meta
    recorded = meta.get("weights_sha256")
    if recorded is not None and recorded != weights_digest(loaded.module):
        raise _altered(path, "its weights do not have the digest recorded inside it", hint)
    side = sidecar_path(path)
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no sidecar (copied alone), or not readable: the archive's own checks stand
    if not isinstance(doc, dict) or doc.get("sha256") is None:
        return
    same = {k: v for k, v in doc.items() if k != "sha256"}
    if json.dumps(same, sort_keys=True, default=str) != json.dumps(meta, sort_keys=True, default=str):
        logger.warning("%s does not describe %s (another training run's record); ignored", side, path)
        return
    if doc["sha256"] != loaded.sha256:
        raise _altered(path, f"its sha256 is {loaded.sha256}, its sidecar {side} records {doc['sha256']}", hint)


def _missing(path: Path, hint: str) -> ConfigError:
    return ConfigError(f"explain.explainer: explainer file {path} does not exist or is not a file: train one "
                       f"with `pcim train-explainer {hint} --out {path}`, or fix explain.explainer")


def load_explainer(path: str | Path, device: str = "cpu", hint: str = "plate.yaml") -> LoadedExplainer:
    """Load an explainer and its metadata; ConfigError (78) when it is missing or not a pcim explainer.

    hint: the plate.yaml to name in the fix ("train one with pcim train-explainer <hint> …").
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, hint)
    _check_archive(path, hint)
    extra = {META_NAME: ""}
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; TorchScript is our format
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        meta = json.loads(extra[META_NAME])
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, zip and JSON errors, …
        raise ConfigError(f"explain.explainer: {path} is not a pcim explainer ({error_summary(exc)}); write one with "
                          f"`pcim train-explainer {hint} --out {path}`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"explain.explainer: {path} is not a pcim explainer (no {FORMAT} record inside); "
                          f"write one with `pcim train-explainer {hint} --out {path}`")
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    loaded = LoadedExplainer(path=path, sha256=file_sha256(path), module=module, meta=meta)
    _check_integrity(loaded, hint)
    logger.info("loaded explainer %s (sha256 %s…, trained for classifier %s…)", path, loaded.sha256[:12],
                str(meta.get("classifier_sha256"))[:12])
    return loaded


def engine_record(opts: PcimOptions) -> dict[str, Any]:
    """The settings of the objective an explainer is trained for (stored in its metadata)."""
    values = {k: getattr(opts, k) for k in OBJECTIVE_KEYS}
    if isinstance(values["budget"], tuple):
        values["budget"] = list(values["budget"])
    return values


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_explainer(loaded: LoadedExplainer, *, model_sha256: str, model_path: str | Path, channels: list[str],
                    normalize: dict[str, Any], classes: list[str], opts: PcimOptions,
                    hint: str = "plate.yaml") -> None:
    """Refuse an explainer trained for another classifier, other channels, another normalisation, other
    classes or another objective: one ConfigError listing every difference, with the fix."""
    meta, path = loaded.meta, loaded.path
    retrain = f"train an explainer for this plate's settings: pcim train-explainer {hint} --out {path}"
    problems = []
    if meta.get("classifier_sha256") != model_sha256:
        problems.append(f"it was trained for the classifier with sha256 {meta.get('classifier_sha256')} "
                        f"({meta.get('classifier_path', '?')}), but model.path {model_path} has sha256 {model_sha256}")
    if list(meta.get("channels", [])) != list(channels):
        problems.append(f"it was trained for channels {', '.join(meta.get('channels', []))} but plate.channels "
                        f"lists {', '.join(channels)}")
    if not _same(meta.get("normalize"), normalize):
        problems.append(f"it was trained on fields normalised with {json.dumps(meta.get('normalize'))} but "
                        f"model.normalize is {json.dumps(normalize)}")
    if len(meta.get("classes", [])) != len(classes):
        problems.append(f"it explains {len(meta.get('classes', []))} classes ({', '.join(meta.get('classes', []))}) "
                        f"but the model has {len(classes)} ({', '.join(classes)})")
    want, have = engine_record(opts), meta.get("engine", {})
    differ = [k for k in OBJECTIVE_KEYS if not _same(have.get(k), want[k])]
    if differ:
        problems.append("it was trained for " + ", ".join(f"explain.{k}={have.get(k)}" for k in differ)
                        + " but this run asks for " + ", ".join(f"explain.{k}={want[k]}" for k in differ)
                        + " (set them back, or retrain)")
    if problems:
        raise ConfigError(f"explain.explainer {path} does not fit this plate: " + "; ".join(problems) + "; "
                          + retrain)
