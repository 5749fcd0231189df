"""`pcim train-explainer`: train an amortised PCIM explainer on the fields of one or more plates.

The plates must share the classifier, channels, normalisation, input size, classes and the engine
settings of the objective (what the explainer is trained for; io/explainer.py refuses a use with
others). Each plate's wells are split into training wells and held-out validation wells (`val_wells`,
or every 5th well spread over the plate). Training fields are read and normalised with the same code
as `pcim explain` (io/images.py) and kept in memory (up to `memory_gib`, fields spread over the
wells); each step draws `batch_size` crops of model.input_size (or of the whole field when the model
takes whole fields, or `crop` px) at random positions with a random flip / 90-degree rotation, each
for the classifier's predicted class (or, for a share `other_targets`, another class: the explainer
answers for every class), and takes one Adam step on the PCIM objective (engine/explainer.py) with a
one-cycle learning-rate schedule. The validation objective is measured on the validation wells'
tiles before and after training.

Resumable and reproducible: a step's crops depend only on (seed, step), and a checkpoint
(`<out>.ckpt`: explainer, optimiser, schedule, step) is written every `checkpoint_every` steps and on
SIGTERM / Ctrl-C (exit 75), so a killed run rerun with the same command continues to the same result.
An explainer already trained with the same settings and data is not retrained (`fresh` does).

Before anything is read, `--out`, its sidecar and its checkpoint are checked (io/outputs.py): each may
only replace a file pcim wrote for an explainer, never another file nor an input of the plates (exit
65). One run per `--out` at a time: a second is refused (exit 75, naming the holder) by a run lock
beside it (`.<out>.pcim-lock`, io/lock.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcim_cli import __version__
from pcim_cli.config import RunConfig
from pcim_cli.engine import explainer as ex
from pcim_cli.engine import tiling
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.errors import ConfigError, InputDataError, PcimError, TemporaryFailure
from pcim_cli.io import explainer as explainer_file
from pcim_cli.io import images, outputs, plate
from pcim_cli.io.lock import RunLock
from pcim_cli.run import inventory
from pcim_cli.run.signals import StopSignals

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """A training run: the engine's TrainOptions plus what data it sees and how it is saved."""

    train: ex.TrainOptions = field(default_factory=ex.TrainOptions)
    crop: int | None = None  # px; None: model.input_size, or whole fields for whole-field models
    val_wells: tuple[str, ...] | None = None  # held out on every plate; None: every 5th well, spread
    checkpoint_every: int = 25
    max_val_tiles: int = 64
    memory_gib: float = 2.0  # training fields kept in memory

    def __post_init__(self) -> None:
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in ("checkpoint_every", "max_val_tiles")
                    if getattr(self, k) < 1]
        if self.crop is not None and self.crop < 8:
            problems.append(f"crop must be >= 8 px, got {self.crop}")
        if problems:
            raise ConfigError("train-explainer: " + "; ".join(problems))


def settings(engine: dict[str, Any], run: dict[str, Any]) -> TrainSettings:
    """TrainSettings from the command line's values (None: the default); ConfigError names a bad one."""
    try:
        topts = ex.TrainOptions(**{k: v for k, v in engine.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"train-explainer: {exc}") from None
    return TrainSettings(train=topts, **{k: v for k, v in run.items() if v is not None})


@dataclass
class TrainResult:
    """What a training run wrote and measured."""

    out: Path
    sidecar: Path
    sha256: str
    meta: dict[str, Any]
    resumed_from: int = 0  # the checkpoint's step (0: a fresh run)
    up_to_date: bool = False  # the explainer was already trained with these settings: nothing done


@dataclass
class _Plate:
    cfg: RunConfig
    inv: inventory.PlateInventory
    train_wells: list[str]
    val_wells: list[str]


@dataclass
class _Data:
    fields: list[torch.Tensor]  # training fields (C, H, W), CPU
    val_x: torch.Tensor  # validation tiles (N, C, h, w)
    crop: tuple[int, int]
    skipped: list[str] = field(default_factory=list)  # unreadable fields


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def train_explainer(cfgs: Sequence[RunConfig], out: str | Path, settings: TrainSettings | None = None,
                    progress: Any = None, fresh: bool = False) -> TrainResult:
    """Train an explainer for the plates' classifier and write it to `out` (+ `out`.json).

    progress: a run.progress.StepProgress (or None). fresh: ignore an existing checkpoint or explainer.
    """
    settings = settings or TrainSettings()
    out = Path(out).expanduser().absolute()
    if not cfgs:
        raise ConfigError("train-explainer needs at least one plate.yaml")
    outputs.check_training(out, cfgs)  # --out, sidecar, checkpoint: pcim's own files only, no input
    with RunLock(out.parent, lock_file=f".{out.name}.pcim-lock", subject=f"the explainer {out}"):
        return _train(cfgs, out, settings, progress, fresh)


def _train(cfgs: Sequence[RunConfig], out: Path, settings: TrainSettings, progress: Any, fresh: bool) -> TrainResult:
    """train_explainer under the lock of `out`."""
    plates = [_plate(cfg, settings) for cfg in cfgs]
    first = plates[0]
    opts = inventory.engine_options(first.cfg)
    key = _key(plates, settings, opts)
    if out.is_file() and not fresh:
        done = _existing(out, key)
        if done is not None:
            logger.info("%s is already trained with these settings and data (use --fresh to retrain)", out)
            return done
    device = first.inv.model.device
    precision = first.cfg.compute.precision
    t_start = time.perf_counter()
    data = _load(plates, settings)
    classes, topts = first.inv.classes, settings.train
    trainer = ex.Trainer(first.inv.model.module, data.fields, len(classes), opts, topts, data.crop, device, precision)
    ckpt = checkpoint_path(out)
    extra = None if fresh else _resume(ckpt, key, trainer)
    if extra is None:
        extra = {"val_before": trainer.validation(data.val_x), "seconds": 0.0}
    resumed_from = trainer.done
    if not len(data.val_x):
        logger.warning("no validation tiles: every well with images is a training well (plates of fewer than 3 "
                       "wells, or --val-wells names none with images), so the held-out objective is not measured; "
                       "name held-out wells with --val-wells")
    if resumed_from:
        logger.info("resuming from %s at step %d of %d", ckpt, resumed_from, topts.steps)
    logger.info("training an explainer for %s (%d classes) on %s: %d training fields, %d validation tiles, "
                "crops %dx%d, %d steps of %d", first.inv.model.path.name, len(classes), device, len(data.fields),
                len(data.val_x), *data.crop, topts.steps, topts.batch_size)
    if progress is not None:
        progress.start(topts.steps, trainer.done)
    t_loop = time.perf_counter()
    with StopSignals(None, first="stopping after this step with a checkpoint (send it again to stop now)") as stop:
        try:
            while trainer.done < topts.steps:
                trainer.step()
                if progress is not None:
                    progress.update(trainer.done, float(np.mean(trainer.losses[-20:])))
                due = trainer.done % settings.checkpoint_every == 0 and trainer.done < topts.steps
                if due or stop.requested:
                    seconds = extra["seconds"] + time.perf_counter() - t_loop
                    _save_checkpoint(ckpt, key, trainer, {**extra, "seconds": seconds})
                if stop.requested:
                    raise TemporaryFailure(f"training interrupted at step {trainer.done} of {topts.steps}; "
                                           f"checkpoint {ckpt}: rerun the same command to resume")
        except KeyboardInterrupt:
            raise TemporaryFailure(f"training stopped at step {trainer.done} of {topts.steps}; rerun the same "
                                   f"command to resume from the last checkpoint ({ckpt})") from None
    train_s = extra["seconds"] + time.perf_counter() - t_loop
    val_after = trainer.validation(data.val_x)
    meta = _meta(plates, settings, opts, data, trainer, extra["val_before"], key, val_after, train_s,
                 time.perf_counter() - t_start, str(device), precision)
    sha = explainer_file.save_explainer(trainer.net.cpu(), out, meta)
    ckpt.unlink(missing_ok=True)
    logger.info("wrote %s (sha256 %s…): objective %.4f on the training crops, %.4f on %d validation tiles "
                "(untrained %.4f)", out, sha[:12], meta["training"]["train_objective"], val_after, len(data.val_x),
                extra["val_before"])
    return TrainResult(out=out, sidecar=explainer_file.sidecar_path(out), sha256=sha, meta=meta,
                       resumed_from=resumed_from)


def describe(result: TrainResult) -> str:
    """The line `pcim train-explainer` prints: what was trained, the objectives, how to use it."""
    training = result.meta["training"]

    def num(key: str) -> str:
        value = training.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    state = "already trained with these settings" if result.up_to_date else (
        f"trained {training['steps']} steps in {training['train_seconds']:.0f} s on {training['device']}"
        + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))
    held = (f"{num('validation_objective')} on {training['validation_tiles']} validation tiles (untrained "
            f"{num('validation_objective_untrained')})" if training.get("validation_tiles") else
            "no validation tiles (name held-out wells with --val-wells)")
    return (f"explainer {result.out} (sha256 {result.sha256[:12]}…): {state}; objective {num('train_objective')} "
            f"on training crops, {held}; use it with --set explain.method=pcim-amortised --set "
            f"explain.explainer={result.out}")


# ---------------------------------------------------------------- plates and wells


def _plate(cfg: RunConfig, settings: TrainSettings) -> _Plate:
    inv = inventory.inspect_plate(cfg, explainer=False)
    wells = sorted(inv.fields, key=plate.parse_well)
    if settings.val_wells is not None:
        names = {plate.parse_well(w).name for w in settings.val_wells}
        val = [w for w in wells if w in names]
    else:
        val = [w for w in wells if wells.index(w) % 5 == 2] if len(wells) >= 3 else []
    train = [w for w in wells if w not in val]
    if not train:
        raise ConfigError(f"{cfg.config_path}: every well with images is a validation well; leave some for "
                          "training (--val-wells)")
    return _Plate(cfg, inv, train, val)


def _same_setup(plates: list[_Plate]) -> None:
    """Every plate must ask for the same classifier, channels, normalisation, input size and objective."""
    first = plates[0]

    def setup(p: _Plate) -> dict[str, Any]:
        return {"classifier sha256": p.inv.model.sha256, "plate.channels": list(p.cfg.plate.channels),
                "model.normalize": p.cfg.model.normalize.model_dump(), "model.input_size": p.cfg.model.input_size,
                "model.classes": p.inv.classes,
                "explain": explainer_file.engine_record(inventory.engine_options(p.cfg))}

    ref = setup(first)
    for p in plates[1:]:
        mine = setup(p)
        differ = [k for k in ref if json.dumps(ref[k], default=str) != json.dumps(mine[k], default=str)]
        if differ:
            raise ConfigError(f"{p.cfg.config_path} differs from {first.cfg.config_path} in {', '.join(differ)}: "
                              "an explainer is trained for one classifier and one set of settings; train one "
                              "per setup")


def _key(plates: list[_Plate], settings: TrainSettings, opts: PcimOptions) -> str:
    """Everything that changes the trained explainer: resuming or reusing needs the same key."""
    _same_setup(plates)
    first = plates[0]
    doc = {
        "classifier": first.inv.model.sha256, "channels": list(first.cfg.plate.channels),
        "normalize": first.cfg.model.normalize.model_dump(), "input_size": first.cfg.model.input_size,
        "classes": first.inv.classes, "engine": explainer_file.engine_record(opts),
        "precision": first.cfg.compute.precision,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "checkpoint_every"},
        "plates": [{"train": {w: [str(s.files) for s in p.inv.fields[w]] for w in p.train_wells},
                    "val": p.val_wells} for p in plates],
        "pcim": __version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- data


def _read(p: _Plate, src: images.FieldSource, skipped: list[str]) -> torch.Tensor | None:
    try:
        return torch.from_numpy(images.read_normalized(src, len(p.cfg.plate.channels),
                                                       p.cfg.model.normalize.model_dump()))
    except PcimError as exc:
        logger.warning("skipped: %s", exc)
        skipped.append(str(exc))
        return None


def _spread(items: list, n: int) -> list:
    """Up to n items evenly spaced over the list."""
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in dict.fromkeys(idx.tolist())]


def _load(plates: list[_Plate], settings: TrainSettings) -> _Data:
    """Training fields (within the memory cap, spread over the wells) and the validation tiles."""
    first = plates[0]
    input_size = first.cfg.model.input_size
    train_src = [(p, s) for p in plates for w in p.train_wells for s in p.inv.fields[w]]
    size = images.typical_size(s for _, s in train_src) or (0, 0)
    per_field = max(1, len(first.cfg.plate.channels) * size[0] * size[1] * 4)
    cap = max(1, int(settings.memory_gib * 2**30 // per_field))
    chosen = _spread(train_src, cap)
    if len(chosen) < len(train_src):
        logger.warning("keeping %d of %d training fields in memory (%.1f GiB cap), spread over the wells",
                       len(chosen), len(train_src), settings.memory_gib)
    skipped: list[str] = []
    fields = [f for f in (_read(p, s, skipped) for p, s in chosen) if f is not None]
    if not fields:
        raise InputDataError("no training field could be read: " + "; ".join(skipped[:3]))
    h = min(f.shape[-2] for f in fields)
    w = min(f.shape[-1] for f in fields)
    if settings.crop is not None:
        crop = (settings.crop, settings.crop)
    elif input_size is not None:
        crop = (int(input_size[0]), int(input_size[1]))
    else:
        crop = (h, w)
    if crop[0] > h or crop[1] > w:
        raise ConfigError(f"train-explainer: crops of {crop[0]}x{crop[1]} px do not fit in the {h}x{w} px fields; "
                          "use a smaller --crop or model.input_size")
    val_tiles = []
    val_src = [(p, s) for p in plates for wl in p.val_wells for s in p.inv.fields[wl]]
    for p, s in _spread(val_src, settings.max_val_tiles):
        x = _read(p, s, skipped)
        if x is None or x.shape[-2] < crop[0] or x.shape[-1] < crop[1]:
            continue
        grid = tiling.plan_tiles(tuple(x.shape[-2:]), crop)
        val_tiles.append(tiling.cut(x, grid, _spread(list(range(grid.n_tiles)), 4)))
    val_x = torch.cat(val_tiles)[: settings.max_val_tiles] if val_tiles else torch.zeros(0, len(fields[0]), *crop)
    return _Data(fields=fields, val_x=val_x, crop=crop, skipped=skipped)


# ---------------------------------------------------------------- checkpoints and the result


def _save_checkpoint(path: Path, key: str, trainer: ex.Trainer, extra: dict) -> None:
    doc = {"format": outputs.CHECKPOINT_FORMAT, "key": key, "trainer": trainer.state_dict(), "extra": extra}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(doc, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        logger.warning("cannot write the checkpoint %s (%s); training goes on without it", path, exc)
        return
    logger.debug("checkpoint %s at step %d", path, trainer.done)


def _resume(path: Path, key: str, trainer: ex.Trainer) -> dict | None:
    """Load the checkpoint into the trainer; its extra record (None without a usable checkpoint)."""
    if not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is not used
        logger.warning("cannot read the checkpoint %s (%s); starting from step 0", path, exc)
        return None
    if doc.get("key") != key:
        raise ConfigError(f"checkpoint {path} belongs to a training run with other settings, plates or classifier; "
                          "rerun with the same settings to resume it, or with --fresh to start over")
    trainer.load_state_dict(doc["trainer"])
    return doc["extra"]


def _existing(out: Path, key: str) -> TrainResult | None:
    try:
        loaded = explainer_file.load_explainer(out)
    except ConfigError:
        return None
    if loaded.meta.get("training", {}).get("key") != key:
        return None
    return TrainResult(out=out, sidecar=explainer_file.sidecar_path(out), sha256=loaded.sha256, meta=loaded.meta,
                       up_to_date=True)


def _meta(plates: list[_Plate], settings: TrainSettings, opts: PcimOptions, data: _Data, trainer: ex.Trainer,
          val_before: float, key: str, val_after: float, train_s: float, total_s: float, device: str,
          precision: str) -> dict[str, Any]:
    first = plates[0]
    net, losses = trainer.net, trainer.losses
    tail = losses[-max(1, min(len(losses), 20)):]
    return {
        "pcim_version": __version__,
        "classifier_sha256": first.inv.model.sha256,
        "classifier_path": str(first.inv.model.path),
        "channels": list(first.cfg.plate.channels),
        "normalize": first.cfg.model.normalize.model_dump(),
        "input_size": first.cfg.model.input_size,
        "crop": list(data.crop),
        "classes": list(first.inv.classes),
        "engine": explainer_file.engine_record(opts),
        "architecture": {"name": "Explainer", "width": net.width, "in_channels": net.in_channels,
                         "n_classes": net.n_classes, "maps_per_class": net.maps_per_class,
                         "resolution": net.resolution, "parameters": sum(p.numel() for p in net.parameters())},
        "training": {
            **dataclasses.asdict(settings.train),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()
               if k != "train"},
            "key": key, "device": device, "precision": precision,
            "train_objective": float(np.mean(tail)) if tail else float("nan"),
            "validation_objective": val_after,
            "validation_objective_untrained": val_before,
            "validation_tiles": int(len(data.val_x)),
            "train_fields": len(data.fields), "skipped_fields": len(data.skipped),
            "train_seconds": round(train_s, 2), "total_seconds": round(total_s, 2),
            "objective_curve": [round(float(np.mean(losses[i : i + 10])), 5) for i in range(0, len(losses), 10)],
        },
        "plates": [{"name": p.cfg.plate.name, "config": str(p.cfg.config_path), "train_wells": p.train_wells,
                    "validation_wells": p.val_wells} for p in plates],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

