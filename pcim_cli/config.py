"""plate.yaml as pydantic models, and the one place settings are merged (shared/DESIGN.md §3.1).

Precedence, lowest first:

1. defaults of the models below;
2. the YAML file;
3. environment variables ``PCIM_<SECTION>__<KEY>=value``, nested with ``__``
   (``PCIM_EXPLAIN__STEPS=100``, ``PCIM_COMPUTE__SLURM__QUEUE=gpu``). Only ``PCIM_`` variables
   with a ``__`` are read, and every one of them must name a real key;
4. command-line overrides ``--set explain.steps=100`` (dotted keys), in the order given.

Override values are parsed as YAML (``[A01, B03]`` is a list, ``null`` is null); a value that is not
valid YAML (e.g. ``{well}_s{field}.tif``) is taken as plain text. With
``compute.cluster: address`` and no address anywhere, ``DASK_SCHEDULER_ADDRESS`` fills it in.

Relative paths (``plate.images``, ``plate.layout``, ``model.path``, ``explain.explainer``,
``output.zarr``, ``output.csv``, ``compute.scheduler_file``) resolve against the YAML file's folder --
also when they come from an override -- never against the working directory; ``~`` is expanded.
``{plate}`` in the output paths becomes the plate name, which defaults to the YAML file's stem.
Unknown keys are errors, and every problem is reported at once in one ConfigError, each as
``<yaml.path>: <what is wrong>``.

YAML (pcim_cli/yaml_reader.py): every plain scalar is read as the text it is written as, and the models
below parse numbers and booleans from it, in decimal: a plate barcode ``0012345`` stays ``0012345``,
``classes: [no, yes]`` stays two class names, ``steps: 010`` is ten. Hostile files (alias bombs, deep
nesting) end in one short ConfigError, and values quoted in messages are cut to a readable length.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from pcim_cli.engine.attribute import METHODS
from pcim_cli.engine.pcim import PcimOptions
from pcim_cli.errors import ConfigError, short, shown
from pcim_cli.io.images import compile_pattern
from pcim_cli.io.plate import parse_well
from pcim_cli.yaml_reader import parse_value, read_yaml

logger = logging.getLogger(__name__)

ENV_PREFIX = "PCIM_"


# ---------------------------------------------------------------- paths


def _check_path_text(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty path")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ~ and anchor a relative path at the YAML file's folder (context 'base_dir')."""
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return value


ConfigPath = Annotated[Path, BeforeValidator(_check_path_text), AfterValidator(_resolve_path)]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors; YAML numbers are accepted where text is due."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


# ---------------------------------------------------------------- plate


class PlateConfig(_Section):
    """`plate:` — where the images are and how their names read."""

    name: str
    images: ConfigPath
    pattern: str = "{well}_s{field}_w{channel}.tif"
    channels: dict[str, str]
    layout: ConfigPath | None = None
    wells: list[str] | None = None
    # a T axis (OME-TIFF, OME-Zarr): the time point to read, from 0; null: a time series is refused
    timepoint: int | None = Field(None, ge=0)
    # object kind -> label-image pattern ({well}/{row}+{col}, {field}, *), relative to the YAML's folder
    objects: dict[str, str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("name") is None:
            default = (info.context or {}).get("default_name")
            if default is not None:
                data = {**data, "name": default}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty plate name")
        if re.search(r"[/\\]", value):
            raise ValueError(f"{short(value)}: a plate name cannot contain '/' or '\\' (it is used in file names)")
        return value

    @field_validator("images", mode="before")
    @classmethod
    def _local_images(cls, value: Any) -> Any:
        """An OME-Zarr plate at a URL is not read yet (io/ome_zarr_plate.py reads local stores)."""
        if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value.strip()):
            raise ValueError(f"{short(value)}: remote stores are not read yet; copy the plate to a local or shared "
                             "file system and give its folder")
        return value

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        compile_pattern(value)  # ConfigError is a ValueError: reported at plate.pattern
        return value

    @field_validator("channels", mode="before")
    @classmethod
    def _normalise_channels(cls, value: Any) -> Any:
        """A list of names, or a mapping name -> file token; always an ordered mapping afterwards."""
        if isinstance(value, (str, int)):
            value = [value]
        if isinstance(value, list):
            items = [(v, v) for v in value]
        elif isinstance(value, dict):
            items = list(value.items())
        else:
            raise ValueError("give a list of channel names, or a mapping name -> file-name token")
        if not items:
            raise ValueError("list at least one channel")
        out: dict[str, str] = {}
        for name, token in items:
            if not isinstance(name, (str, int)) or not isinstance(token, (str, int)):
                raise ValueError(f"channel {short(name)}: names and tokens must be text, got {short(token)}")
            name, token = str(name), str(token)
            if not name.strip() or not token.strip():
                raise ValueError("channel names and tokens cannot be empty")
            if name in out:
                raise ValueError(f"channel {short(name)} is listed twice")
            out[name] = token
        tokens = [t.lower() for t in out.values()]
        dupes = sorted({t for t in tokens if tokens.count(t) > 1})
        if dupes:
            raise ValueError(f"file-name token(s) {', '.join(dupes)} used for more than one channel")
        return out

    @field_validator("objects", mode="before")
    @classmethod
    def _check_objects(cls, value: Any, info: ValidationInfo) -> Any:
        """Object names usable in file and column names; patterns as plate.pattern (no {channel}),
        anchored at the YAML file's folder."""
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise ValueError("give a mapping object name -> label-image pattern, e.g. "
                             "{Nuclei: 'labels/{well}_s{field}_nuclei.tif'}")
        base = (info.context or {}).get("base_dir")
        out: dict[str, str] = {}
        for name, pattern in value.items():
            name = str(name)
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"object name {name!r}: use letters, digits and '_' (it names "
                                 "{plate}_pcim_<name>.csv and the store's labels), e.g. Nuclei")
            if not isinstance(pattern, str) or not pattern.strip():
                raise ValueError(f"{name}: give the label images' file pattern, e.g. labels/{{well}}_s{{field}}.tif")
            if "{channel}" in pattern:
                raise ValueError(f"{name}: a label image has no channels; remove {{channel}} from {pattern!r}")
            compile_pattern(pattern)  # unknown or repeated placeholders, no well
            path = Path(pattern).expanduser()
            if base is not None and not path.is_absolute():
                path = Path(base) / path
            out[name] = path.as_posix()
        return out

    @field_validator("wells", mode="before")
    @classmethod
    def _canonical_wells(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError("give a list of wells, e.g. [A01, B03]")
        names = [parse_well(str(v)).name for v in value]  # WellIdError is a ValueError
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"well(s) {', '.join(dupes)} listed twice")
        return names


# ---------------------------------------------------------------- model


class _Clipped(_Section):
    """`clip: false` (a bioimage.io package's scale without a clip) is written out; the default `true` is
    not, so the settings fingerprint of every plate made before the key existed stays the same."""

    clip: bool = True  # clip the scaled values to [0, 1]

    @model_serializer(mode="wrap")
    def _drop_default_clip(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("clip") is True:
            data.pop("clip")
        return data


class NormalizePercentile(_Clipped):
    """Map each channel's `low` / `high` percentile to 0 / 1 (per field)."""

    method: Literal["percentile"] = "percentile"
    low: float = Field(1.0, ge=0, le=100)
    high: float = Field(99.8, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> NormalizePercentile:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class NormalizeFixed(_Clipped):
    """Map the fixed intensities `min` / `max` to 0 / 1 (e.g. 0 and 65535): one value, or one per channel."""

    method: Literal["fixed"] = "fixed"
    min: float | list[float]
    max: float | list[float]

    @model_validator(mode="after")
    def _ordered(self) -> NormalizeFixed:
        lows = self.min if isinstance(self.min, list) else [self.min]
        highs = self.max if isinstance(self.max, list) else [self.max]
        if len(lows) > 1 and len(highs) > 1 and len(lows) != len(highs):
            raise ValueError(f"{len(lows)} min values but {len(highs)} max values: give one per channel")
        n = max(len(lows), len(highs))
        for i, (lo, hi) in enumerate(zip(lows * (n // len(lows)), highs * (n // len(highs)), strict=True)):
            if lo >= hi:
                where = f" (channel {i + 1})" if n > 1 else ""
                raise ValueError(f"min ({lo}) must be below max ({hi}){where}")
        return self


class NormalizeZscore(_Section):
    """(value - the channel's mean) / (its standard deviation + eps), per field (a bioimage.io package's
    zero_mean_unit_variance)."""

    method: Literal["zscore"] = "zscore"
    eps: float = Field(1e-6, gt=0, le=0.1)


class NormalizeNone(_Section):
    """Feed raw intensities to the model."""

    method: Literal["none"] = "none"


Normalize = Annotated[NormalizePercentile | NormalizeFixed | NormalizeZscore | NormalizeNone,
                     Field(discriminator="method")]


class ModelConfig(_Section):
    """`model:` — the classifier and what its input must look like."""

    path: ConfigPath
    classes: list[str] | None = None
    input_size: tuple[PositiveInt, PositiveInt] | None = None
    # a tiled field's prediction: mean of the tiles' logits (measured default, docs/method.md), of their
    # probabilities, the largest probability per class, or the model on the untiled field (any-size models)
    aggregate: Literal["mean-prob", "mean-logit", "max", "whole-field"] = "mean-logit"
    normalize: Normalize = Field(default_factory=NormalizePercentile)
    # model.path a bioimage.io package: plate.yaml keys that win over what the package states
    override_package: list[Literal["normalize", "channels", "classes", "input_size"]] = []

    @field_validator("override_package", mode="before")
    @classmethod
    def _override_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("normalize", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`normalize: none` (or null) and `normalize: percentile` stand for `{method: ...}`."""
        if value is None:
            return {"method": "none"}
        if isinstance(value, str):
            return {"method": value}
        return value

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one class name, or leave model.classes out")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"class name(s) {', '.join(dupes)} listed twice")
        return value


# ---------------------------------------------------------------- explain

_ENGINE = PcimOptions()  # the engine's defaults are the config's defaults


class ExplainConfig(_Section):
    """`explain:` — what to attribute and how. Engine settings are flat keys of this section."""

    method: Literal[METHODS] = "pcim"  # pcim, the baselines, the trivial maps (engine/attribute.py)
    target: str = "predicted"  # predicted | a class name | layout:<column> | all
    # pcim-amortised: the file `pcim train-explainer` wrote; refine_steps of the per-image fit from its logits
    explainer: ConfigPath | None = None
    refine_steps: int = Field(_ENGINE.refine_steps, ge=0)
    refine_lr: float = Field(_ENGINE.refine_lr, gt=0)
    steps: PositiveInt = _ENGINE.steps
    lr: float = Field(_ENGINE.lr, gt=0)
    per_channel: bool = _ENGINE.per_channel
    seed: int = Field(_ENGINE.seed, ge=0)
    # engine settings (pcim_cli.engine.pcim.PcimOptions; docs/method.md says why these defaults)
    resolution: PositiveInt = _ENGINE.resolution  # mixing weights at 1/resolution of the field, upsampled
    # share of the field a map may keep (several: one fit each, maps averaged); null: the paper's n*alpha
    budget: float | list[float] | None = _ENGINE.budget
    objective: Literal["keep", "keep-delete"] = _ENGINE.objective
    loss: Literal["ce", "logit"] = _ENGINE.loss
    keep_substrate: Literal["none", "zero", "mean", "blur"] = _ENGINE.keep_substrate
    delete_substrate: Literal["none", "zero", "mean", "blur"] = _ENGINE.delete_substrate
    blur_sigma: float = Field(_ENGINE.blur_sigma, ge=0)
    entropy: float = Field(_ENGINE.entropy, ge=0)
    tv: float = Field(_ENGINE.tv, ge=0)
    noise: float = Field(_ENGINE.noise, ge=0)
    patience: int = Field(_ENGINE.patience, ge=0)  # early stopping; 0 = always run `steps`
    # how the fit proceeds (engine/schedule.py; docs/method.md "Fewer passes per map"): lr schedule, linear
    # warm-up steps, first logits (gradient: from the input gradient, one more pass) and their peak
    schedule: Literal["constant", "cosine", "step"] = _ENGINE.schedule
    warmup: int = Field(_ENGINE.warmup, ge=0)
    init: Literal["zero", "gradient"] = _ENGINE.init
    init_scale: float = Field(_ENGINE.init_scale, gt=0)
    tol: float = Field(_ENGINE.tol, gt=0)
    map_contrast: bool = _ENGINE.map_contrast  # map x |field - deleted value|: relevance on the pixels, not beside
    # baseline settings (method: integrated-gradients | occlusion | rise); PCIM ignores them
    ig_steps: PositiveInt = _ENGINE.ig_steps  # integrated gradients: Riemann steps from the zero image
    occlusion_window: PositiveInt = _ENGINE.occlusion_window  # px, set to the channel mean
    occlusion_stride: PositiveInt = _ENGINE.occlusion_stride  # px
    rise_masks: PositiveInt = _ENGINE.rise_masks  # random masks per map
    rise_cell: PositiveInt = _ENGINE.rise_cell  # px per cell of the random mask grid
    rise_p: float = Field(_ENGINE.rise_p, gt=0, lt=1)  # probability that a cell is kept
    # intensity: the channel shown (a name of plate.channels); auto: per image, the channel whose intensity
    # removes the class fastest (pcim evaluate reports the best one for the plate)
    intensity_channel: str = "auto"
    fidelity: bool = True  # deletion / insertion AUC of every map into the CSV
    # plate.objects: how many top objects (by share) are deleted together for the field's drop, and outlined
    top_objects: PositiveInt = 3
    # tiled fields: one fit over the whole field (one softmax, the budget spent over the field) or per tile
    tile_maps: Literal["field", "per-tile", "evidence"] = "field"
    # grow the budget (x2 per refit) until deleting the map's pixels removes half of p(target), up to this
    # share of the field; null: the fixed budget
    adaptive_budget: float | None = Field(None, gt=0, le=1)

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, value: float | list[float] | None) -> float | list[float] | None:
        values = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and not value:
            raise ValueError("empty list: give one budget, several, or null")
        if any(not 0 < v <= 1 for v in values):
            raise ValueError(f"every budget must be a share of the field in (0, 1], got {short(value)}")
        return value

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty target: use predicted, all, a class name or layout:<column>")
        if value.startswith("layout:") and not value[len("layout:") :].strip():
            raise ValueError("'layout:' needs a column name, e.g. layout:moa")
        return value


# ---------------------------------------------------------------- compute


class SlurmConfig(_Section):
    """`compute.slurm:` — dask-jobqueue SLURMCluster settings."""

    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    cores: PositiveInt = 4
    memory: str = "16GB"
    gpus: int = Field(1, ge=0)
    jobs: PositiveInt = 1
    job_extra: list[str] = Field(default_factory=list)

    @field_validator("walltime")
    @classmethod
    def _check_walltime(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", value.strip()):
            raise ValueError(f"{short(value)} is not a Slurm time limit (e.g. \"01:00:00\" or \"2-00:00:00\")")
        return value.strip()


#: a Dask scheduler address: optional protocol, host (name, IPv4 or [IPv6]), port
DASK_ADDRESS = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})")


class ComputeConfig(_Section):
    """`compute:` — where and how the work runs."""

    cluster: Literal["none", "local", "address", "scheduler-file", "slurm"] = "local"
    address: str | None = None
    scheduler_file: ConfigPath | None = None
    workers: Literal["auto"] | PositiveInt = "auto"
    device: str = "auto"
    batch_size: PositiveInt = 16
    # torch threads per fitting process: auto = the CPUs it may really use (affinity, cgroup quota, SLURM,
    # OMP_NUM_THREADS) shared among the workers of a host, or 1 when the first fit steps are faster so
    threads: Literal["auto"] | PositiveInt = "auto"
    # speed levers (benchmarks/bench.py): NHWC inputs, used only when the model gives the same logits with them
    channels_last: bool = True
    # reduced-precision forward (autocast): faster on GPUs, changes maps slightly (part of the fingerprint)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @field_validator("workers", "threads", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> Any:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            value = int(value)
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"must be 'auto' or a positive whole number, got {short(value)}")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{short(value)} is not a device: use auto, cpu, cuda or cuda:<index>")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        """A Dask scheduler address: [tcp|tls|ws|wss|ucx://]host:port (checked here, not by a hung connect)."""
        if value is None:
            return None
        match = DASK_ADDRESS.fullmatch(value.strip())
        if match is None or not 0 < int(match.group("port")) < 65536:
            raise ValueError(f"{short(value)} is not a Dask scheduler address: give scheme://host:port, e.g. "
                             "tcp://node12:8786 (what `dask scheduler` prints as 'Scheduler at')")
        return value.strip()


# ---------------------------------------------------------------- output


def _check_template(value: Any) -> Any:
    if isinstance(value, str):
        unknown = sorted(set(re.findall(r"\{([^{}]*)\}", value)) - {"plate"})
        if unknown:
            raise ValueError(f"unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                             "only {plate} is filled in")
    return value


OutputPath = Annotated[ConfigPath, BeforeValidator(_check_template)]


def _no_placeholder(value: Any) -> Any:
    if isinstance(value, str) and "{" in value:
        raise ValueError("one file for the whole screen: no {placeholders} (e.g. out/screen_pcim.csv)")
    return value


class OutputConfig(_Section):
    """`output:` — the OME-Zarr store and the CSV summary."""

    zarr: OutputPath = Field(Path("out/{plate}.zarr"), validate_default=True)
    csv: OutputPath = Field(Path("out/{plate}_pcim.csv"), validate_default=True)
    format: Literal["0.5", "0.4"] = "0.5"
    #: one CSV for a whole screen: every plate's rows, rebuilt at the end of every run (pcim_cli/screen.py)
    screen_csv: Annotated[ConfigPath, BeforeValidator(_no_placeholder)] | None = None

    @field_validator("format", mode="before")
    @classmethod
    def _float_format(cls, value: Any) -> Any:
        return str(value) if isinstance(value, float) else value


# ---------------------------------------------------------------- top level


class _CrossProblems(ValueError):
    """Problems found across sections, each with its own YAML path."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))
        self.problems = problems


class RunConfig(_Section):
    """The whole plate.yaml. `config_path` / `base_dir` tell where it was read from (not YAML keys)."""

    plate: PlateConfig
    model: ModelConfig
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    _config_path: Path | None = PrivateAttr(default=None)
    _model_package: Any = PrivateAttr(default=None)  # run/model_package.py: a bioimage.io package applied

    @property
    def config_path(self) -> Path | None:
        """The YAML file this config was loaded from (None when built in code)."""
        return self._config_path

    @property
    def base_dir(self) -> Path | None:
        """The folder relative paths were resolved against."""
        return None if self._config_path is None else self._config_path.parent

    @property
    def class_names(self) -> list[str] | None:
        """model.classes, or None when the model's output count decides ("0", "1", …)."""
        return self.model.classes

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """Missing or null optional sections validate as `{}`, so their paths resolve in context."""
        if isinstance(data, dict):
            data = {**data, **{k: {} for k in ("explain", "compute", "output") if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _across_sections(self) -> RunConfig:
        name = self.plate.name
        self.output.zarr = Path(str(self.output.zarr).replace("{plate}", name))
        self.output.csv = Path(str(self.output.csv).replace("{plate}", name))
        problems: list[tuple[str, str]] = []
        target = self.explain.target
        if target.startswith("layout:") and self.plate.layout is None:
            problems.append(("explain.target", f"{short(target)} reads the layout, but plate.layout is not set"))
        elif target not in ("predicted", "all") and not target.startswith("layout:"):
            classes = self.model.classes
            if classes is not None and target not in classes:
                problems.append(("explain.target", f"{short(target)} is not in model.classes ({', '.join(classes)})"
                                 + _did_you_mean(target, classes)))
            elif classes is None and not target.isdigit():
                problems.append(("explain.target", f"{short(target)} is not a class: model.classes is not set, so "
                                 "classes are named 0, 1, …; list model.classes or use predicted / all"))
        if self.explain.method == "pcim-amortised" and self.explain.explainer is None:
            problems.append(("explain.explainer", "required with explain.method: pcim-amortised: the file that "
                             "`pcim train-explainer plate.yaml --out explainer.pt` wrote"))
        channel = self.explain.intensity_channel
        if channel != "auto" and channel not in self.plate.channels:
            problems.append(("explain.intensity_channel", f"{channel!r} is not in plate.channels "
                             f"({', '.join(self.plate.channels)}); use one of them or auto"
                             + _did_you_mean(channel, list(self.plate.channels))))
        budget = self.explain.budget
        if self.explain.adaptive_budget is not None:
            if not isinstance(budget, (int, float)):
                problems.append(("explain.adaptive_budget", "grows one budget: set explain.budget to one share "
                                 f"(it is {budget}), or adaptive_budget to null"))
            elif budget > self.explain.adaptive_budget:
                problems.append(("explain.adaptive_budget", f"{self.explain.adaptive_budget} is below explain.budget "
                                 f"({budget}): give the largest share the budget may grow to"))
        compute = self.compute
        if compute.cluster == "address" and not compute.address:
            problems.append(("compute.address", "required with compute.cluster: address "
                             "(e.g. tcp://host:8786; or set DASK_SCHEDULER_ADDRESS)"))
        if compute.cluster == "scheduler-file" and compute.scheduler_file is None:
            problems.append(("compute.scheduler_file", "required with compute.cluster: scheduler-file"))
        if problems:
            raise _CrossProblems(problems)
        return self


# ---------------------------------------------------------------- overrides


def _set_key(data: dict[str, Any], keys: list[str], value: Any) -> str | None:
    """Set data[k0][k1]... = value, creating mappings; a problem message if a parent is not a mapping."""
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            return f"cannot set a key below {'.'.join(keys[: i + 1])}: it is {short(child)}, not a mapping"
        node = child
    node[keys[-1]] = value
    return None


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], str, str]]:
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and "__" in name:
            keys = name[len(ENV_PREFIX) :].lower().split("__")
            out.append((keys, environ[name], f"environment variable {name}"))
    return out


def _cli_overrides(overrides: Sequence[str], problems: list[str]) -> list[tuple[list[str], str, str]]:
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            problems.append(f"--set {text}: expected section.key=value, e.g. --set explain.steps=100")
            continue
        out.append(([k.strip() for k in keys], value, f"--set {text}"))
    return out


# ---------------------------------------------------------------- error messages


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_of(annotation: Any) -> type[BaseModel] | dict[str, type[BaseModel]] | None:
    """The model behind a field annotation; {tag: model} for a discriminated union."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if inspect.isclass(a) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
        if models:
            return {typing.get_args(m.model_fields["method"].annotation)[0]: m for m in models}
    return None


def _locate(loc: tuple[Any, ...]) -> tuple[str, Any]:
    """YAML path of a pydantic error location, and the model holding its last key."""
    parts: list[str] = []
    node: Any = RunConfig
    parent: Any = None
    for item in loc:
        if isinstance(node, dict) and item in node:  # discriminated-union tag: not a YAML key
            node = node[item]
            continue
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
            node = None
            continue
        parent = node
        parts.append(str(item))
        fields = getattr(node, "model_fields", {}) if inspect.isclass(node) else {}
        node = _section_of(fields[item].annotation) if item in fields else None
    return ".".join(parts), parent


def _quoted(ctx_text: str) -> list[str]:
    return re.findall(r"'([^']*)'", ctx_text)


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    """(yaml path, message) for one pydantic error."""
    path, parent = _locate(tuple(err["loc"]))
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = list(getattr(parent, "model_fields", {}))
        hint = _did_you_mean(key, allowed) or (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return path, f"unknown key{hint}"
    if kind == "missing":
        return path, "required key missing"
    if kind == "literal_error":
        allowed = _quoted(ctx.get("expected", ""))
        return path, (f"{short(value)} is not allowed: use one of {', '.join(allowed)}"
                      f"{_did_you_mean(str(value), allowed)}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        allowed = _quoted(ctx.get("expected_tags", "")) or ["percentile", "fixed", "zscore", "none"]
        where = f"{path}.method" if path else "method"
        if kind == "union_tag_not_found":
            return where, f"required key missing (one of {', '.join(allowed)})"
        tag = str(ctx.get("tag"))
        return where, f"{short(tag)} is not allowed: use one of {', '.join(allowed)}{_did_you_mean(tag, allowed)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"must be a mapping of keys, got {short(value)}"
    if kind == "value_error":
        return path, str(ctx.get("error", err["msg"]))
    message = err["msg"][:1].lower() + err["msg"][1:]
    if value is None or isinstance(value, (str, int, float, bool)):
        message += f" (got {shown(value)})"
    return path, message


def _format_problems(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, _CrossProblems):
            out.extend(error.problems)
        else:
            out.append(_describe(err))
    return out


def _with_origin(path: str, message: str, origins: Mapping[str, str]) -> str:
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:n]))
        if origin:
            return f"{path}: {message} [from {origin}]"
    below = [o for key, o in origins.items() if key.startswith(path + ".")] if path else []
    if below:
        return f"{path}: {message} [from {', '.join(below)}]"
    return f"{path}: {message}" if path else message


# ---------------------------------------------------------------- entry point


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Read plate.yaml, apply `PCIM_*` environment and `--set` overrides, validate, resolve paths.

    Raises ConfigError naming the file and listing every problem as `<yaml.path>: <what is wrong>`.
    """
    path = Path(path).expanduser().absolute()
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with the sections "
                          f"{', '.join(RunConfig.model_fields)}, got {type(data).__name__}")
    return config_from_data(data, path, overrides, environ)


def config_from_data(
    data: dict[str, Any],
    path: Path,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    where: str | None = None,
    default_name: str | None = None,
) -> RunConfig:
    """Validate the sections read from `path` (relative paths resolve against its folder) with the
    environment and `--set` overrides on top. `where` names the config in messages (default: the path);
    `default_name` is plate.name when the sections give none (default: the file's stem)."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    origins: dict[str, str] = {}
    for keys, text, origin in _env_overrides(environ) + _cli_overrides(overrides, problems):
        trouble = _set_key(data, keys, parse_value(text, origin))
        if trouble:
            problems.append(f"{'.'.join(keys)}: {trouble} [from {origin}]")
        else:
            origins[".".join(keys)] = origin
    compute = data.get("compute")
    if isinstance(compute, dict) and compute.get("cluster") == "address" and not compute.get("address"):
        address = environ.get("DASK_SCHEDULER_ADDRESS")
        if address:
            compute["address"] = address
            origins["compute.address"] = "environment variable DASK_SCHEDULER_ADDRESS"

    config: RunConfig | None = None
    try:
        config = RunConfig.model_validate(data, context={"base_dir": path.parent,
                                                         "default_name": default_name or path.stem})
    except ValidationError as exc:
        problems.extend(_with_origin(p, m, origins) for p, m in _format_problems(exc))
    if problems or config is None:
        listed = "\n".join(f"  {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"invalid configuration {where or path} ({len(problems)} {noun}):\n{listed}")
    config._config_path = path
    logger.debug("loaded %s (plate %s, %d override(s))", path, config.plate.name, len(origins))
    return config


def _is_path(annotation: Any) -> bool:
    """The annotation is (or holds) a ConfigPath: a path anchored at the YAML file's folder."""
    if typing.get_origin(annotation) is Annotated:
        if any(getattr(m, "func", None) is _resolve_path for m in annotation.__metadata__):
            return True
        return _is_path(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_is_path(a) for a in typing.get_args(annotation))
    return False


def path_keys() -> list[tuple[str, str]]:
    """(section, key) of every key whose value is a path relative to the YAML file (screen.py merges
    sections read from different files by anchoring these first)."""
    out = []
    for section, info in RunConfig.model_fields.items():
        model = _section_of(info.annotation)
        if inspect.isclass(model):
            out += [(section, key) for key, f in model.model_fields.items()
                    if _is_path(f.annotation) or any(getattr(m, "func", None) is _resolve_path for m in f.metadata)]
    return out
