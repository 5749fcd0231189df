"""The sections of plate.yaml as pydantic models (docs/reference/plate-yaml.md lists every key).

`RunConfig` is the whole file: `plate`, `model`, `explain` (config/explain.py, derived from the engine's
options), `compute`, `output`, `qc` (config/qc.py), and the checks across sections. Each field's `description` is what
`pcim schema` and `pcim init`'s template say about it. Loading, overrides and messages: config/load.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from pcim_cli.config.base import ConfigPath, Section
from pcim_cli.config.explain import ExplainConfig
from pcim_cli.config.messages import CrossProblems, did_you_mean
from pcim_cli.config.qc import QcConfig, qc_problems
from pcim_cli.engine.options import Aggregate
from pcim_cli.errors import short
from pcim_cli.io.patterns import compile_pattern
from pcim_cli.io.plate import parse_well

__all__ = ["DASK_ADDRESS", "ComputeConfig", "ExplainConfig", "ModelConfig", "Normalize", "NormalizeFixed",
           "NormalizeNone", "NormalizePercentile", "NormalizeZscore", "OutputConfig", "PlateConfig", "QcConfig",
           "RunConfig",
           "SlurmConfig"]


# ---------------------------------------------------------------- plate


class PlateConfig(Section):
    """`plate:` — where the images are and how their names read."""

    name: str = Field(description="Metadata_Plate in the CSV; null: the YAML file's name without .yaml")
    images: ConfigPath = Field(description=(
        "the folder with the TIFFs, or an OME-Zarr HCS plate (NGFF 0.4 / 0.5: wells and fields from its "
        "metadata, channels by their omero labels, plate.pattern unused)"))
    pattern: str = Field("{well}_s{field}_w{channel}.tif", description=(
        "tokens: {well} (A1, A01, A001 all accepted) or {row} and {col}; {field}; {channel}; '*' matches "
        "anything (vendor GUIDs). Without {channel}, each file is one multi-channel stack (TIFF pages, or an "
        "OME-TIFF / ImageJ hyperstack with a C axis; a Z axis is max-projected)"))
    channels: dict[str, str] = Field(description=(
        "the model's input channels in order; name -> the {channel} token in file names (a plain list "
        "[DNA, PH3, Actin] when file names carry the names themselves, or for an OME-Zarr plate its channel "
        "labels; {DNA: 0}: the 0-based channel index of a store without labels)"))
    layout: ConfigPath | None = Field(None, description="optional CSV/TSV/XLSX plate map: a 'well' column + "
                                                        "annotation columns (Metadata_<column> in the CSV)")
    wells: list[str] | None = Field(None, description="optional subset of wells, e.g. [A01, B03]")
    timepoint: int | None = Field(None, ge=0, description=(
        "a time series (OME-TIFF / OME-Zarr T axis): the time point to read, from 0; null: a time series is "
        "refused"))
    objects: dict[str, str] | None = Field(None, description=(
        "optional label images (0 = background, 1..N = objects): object name -> label-image pattern (tokens "
        "as pattern, no {channel}), e.g. {Nuclei: labels/{well}_s{field}_nuclei.tif}; per-object tables "
        "{plate}_pcim_<Object>.csv"))

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


class Clipped(Section):
    """`clip: false` (a bioimage.io package's scale without a clip) is written out; the default `true` is
    not, so the settings fingerprint of every plate made before the key existed stays the same."""

    clip: bool = Field(True, description="clip the scaled values to [0, 1]")

    @model_serializer(mode="wrap")
    def _drop_default_clip(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("clip") is True:
            data.pop("clip")
        return data


class NormalizePercentile(Clipped):
    """Map each channel's `low` / `high` percentile to 0 / 1 (per field)."""

    method: Literal["percentile"] = "percentile"
    low: float = Field(1.0, ge=0, le=100, description="percentile mapped to 0")
    high: float = Field(99.8, ge=0, le=100, description="percentile mapped to 1")

    @model_validator(mode="after")
    def _ordered(self) -> NormalizePercentile:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class NormalizeFixed(Clipped):
    """Map the fixed intensities `min` / `max` to 0 / 1 (e.g. 0 and 65535): one value, or one per channel."""

    method: Literal["fixed"] = "fixed"
    min: float | list[float] = Field(description="intensity mapped to 0 (one value, or one per channel)")
    max: float | list[float] = Field(description="intensity mapped to 1 (one value, or one per channel)")

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


class NormalizeZscore(Section):
    """(value - the channel's mean) / (its standard deviation + eps), per field (a bioimage.io package's
    zero_mean_unit_variance)."""

    method: Literal["zscore"] = "zscore"
    eps: float = Field(1e-6, gt=0, le=0.1, description="added to the standard deviation")


class NormalizeNone(Section):
    """Feed raw intensities to the model."""

    method: Literal["none"] = "none"


Normalize = Annotated[NormalizePercentile | NormalizeFixed | NormalizeZscore | NormalizeNone,
                     Field(discriminator="method")]
#: a key of plate.yaml's model section that may win over what a bioimage.io package states
PackageKey = Literal["normalize", "channels", "classes", "input_size"]


class ModelConfig(Section):
    """`model:` — the classifier and what its input must look like."""

    path: ConfigPath = Field(description=(
        "TorchScript (.ts, .pt), torch.export archive (.pt2), or a bioimage.io model package (.zip, rdf.yaml "
        "or its folder; pip install 'pcim-cli[bioimageio]'): its weights, and classes, input_size and "
        "normalize where these keys are left out (a key that disagrees with it: exit 78)"))
    classes: list[str] | None = Field(None, description="output names in order, e.g. [negative, mitotic]; "
                                                        "null: \"0\", \"1\", ...")
    input_size: tuple[PositiveInt, PositiveInt] | None = Field(None, description=(
        "[H, W] the model needs (fields are tiled to it); null: whole fields"))
    aggregate: Aggregate = Field("mean-logit", description=(
        "a tiled field's prediction: mean-logit | mean-prob | max (of its tiles) | whole-field (the model on "
        "the untiled field)"))
    normalize: Normalize = Field(default_factory=NormalizePercentile, description=(
        "per channel and field, as in training: {method: percentile, low, high}, {method: fixed, min, max} "
        "(one value or one per channel), {method: zscore} or {method: none}; percentile and fixed clip to "
        "[0, 1] unless clip: false"))
    override_package: list[PackageKey] = Field([], description=(
        "model.path a bioimage.io package: the keys of this file that win over what it states (normalize, "
        "channels, classes, input_size)"))

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


# ---------------------------------------------------------------- compute


class SlurmConfig(Section):
    """`compute.slurm:` — dask-jobqueue SLURMCluster settings."""

    queue: str | None = Field(None, description="the partition (sbatch -p)")
    account: str | None = Field(None, description="the account (sbatch -A)")
    walltime: str = Field("01:00:00", description="time limit of each worker job")
    cores: PositiveInt = Field(4, description="CPUs per worker job")
    memory: str = Field("16GB", description="memory per worker job")
    gpus: int = Field(1, ge=0, description="GPUs per worker job (one worker process each)")
    jobs: PositiveInt = Field(1, description="worker jobs submitted")
    job_extra: list[str] = Field(default_factory=list, description="extra #SBATCH directives, e.g. "
                                                                   "[\"--qos=high\"]")

    @field_validator("walltime")
    @classmethod
    def _check_walltime(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", value.strip()):
            raise ValueError(f"{short(value)} is not a Slurm time limit (e.g. \"01:00:00\" or \"2-00:00:00\")")
        return value.strip()


#: a Dask scheduler address: optional protocol, host (name, IPv4 or [IPv6]), port
DASK_ADDRESS = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})")


class ComputeConfig(Section):
    """`compute:` — where and how the work runs."""

    cluster: Literal["none", "local", "address", "scheduler-file", "slurm"] = Field("local", description=(
        "none (in this process) | local (worker processes here) | address | scheduler-file (a running Dask "
        "scheduler) | slurm (worker jobs pcim submits)"))
    address: str | None = Field(None, description="cluster: address: tcp://host:8786 (or DASK_SCHEDULER_ADDRESS)")
    scheduler_file: ConfigPath | None = Field(None, description="cluster: scheduler-file: the JSON file "
                                                                "`dask scheduler --scheduler-file` writes")
    workers: Literal["auto"] | PositiveInt = Field("auto", description="local: worker processes; auto: one per "
                                                                       "visible GPU, else 1")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:<index>")
    batch_size: PositiveInt = Field(16, description="images (fields or tiles) fitted together on one device")
    threads: Literal["auto"] | PositiveInt = Field("auto", description=(
        "torch threads per fitting process: auto (the CPUs it may really use, shared among a host's workers; "
        "1 when the first fit steps are faster so) | N"))
    channels_last: bool = Field(True, description="NHWC inputs when the model gives the same logits with them "
                                                  "(faster)")
    precision: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "bfloat16 / float16: faster on GPUs, maps change slightly (part of the settings fingerprint)"))
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="cluster: slurm: one worker per job")

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


class OutputConfig(Section):
    """`output:` — the OME-Zarr store and the CSV summary."""

    zarr: OutputPath = Field(Path("out/{plate}.zarr"), validate_default=True,
                             description="OME-Zarr HCS store of the maps ({plate}: the plate name)")
    csv: OutputPath = Field(Path("out/{plate}_pcim.csv"), validate_default=True,
                            description="the CSV summary: one row per (well, field, target)")
    format: Literal["0.5", "0.4"] = Field("0.5", description="OME-NGFF 0.5 (Zarr v3) or \"0.4\" (Zarr v2)")
    screen_csv: Annotated[ConfigPath, BeforeValidator(_no_placeholder)] | None = Field(None, description=(
        "several plates in one command: every plate's rows in one CSV, rebuilt at the end of every run"))

    @field_validator("format", mode="before")
    @classmethod
    def _float_format(cls, value: Any) -> Any:
        return str(value) if isinstance(value, float) else value


# ---------------------------------------------------------------- top level


class RunConfig(Section):
    """The whole plate.yaml. `config_path` / `base_dir` tell where it was read from (not YAML keys)."""

    plate: PlateConfig
    model: ModelConfig
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    qc: QcConfig = Field(default_factory=QcConfig)

    _config_path: Path | None = PrivateAttr(default=None)
    _model_package: Any = PrivateAttr(default=None)  # run/model_package.py: a bioimage.io package applied

    def read_from(self, path: Path) -> RunConfig:
        """Record the YAML file this config was read from (config/load.py)."""
        self._config_path = path
        return self

    def with_package(self, applied: Any) -> RunConfig:
        """Record the bioimage.io package applied to this config (run/model_package.py)."""
        self._model_package = applied
        return self

    @property
    def model_package(self) -> Any:
        """The bioimage.io package applied to this config (None: model.path is a model file)."""
        return self._model_package

    @property
    def config_path(self) -> Path | None:
        """The YAML file this config was loaded from (None when built in code)."""
        return self._config_path

    @property
    def base_dir(self) -> Path | None:
        """The folder relative paths were resolved against."""
        return None if self._config_path is None else self._config_path.parent

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """Missing or null optional sections validate as `{}`, so their paths resolve in context."""
        if isinstance(data, dict):
            data = {**data, **{k: {} for k in ("explain", "compute", "output", "qc") if data.get(k) is None}}
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
        elif target not in ("predicted", "contrastive", "all") and not target.startswith("layout:"):
            classes = self.model.classes
            if classes is not None and target not in classes:
                problems.append(("explain.target", f"{short(target)} is not in model.classes ({', '.join(classes)})"
                                 + did_you_mean(target, classes)))
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
                             + did_you_mean(channel, list(self.plate.channels))))
        compute = self.compute
        if compute.cluster == "address" and not compute.address:
            problems.append(("compute.address", "required with compute.cluster: address "
                             "(e.g. tcp://host:8786; or set DASK_SCHEDULER_ADDRESS)"))
        if compute.cluster == "scheduler-file" and compute.scheduler_file is None:
            problems.append(("compute.scheduler_file", "required with compute.cluster: scheduler-file"))
        problems += qc_problems(self.qc, list(self.plate.channels), list(self.plate.objects or {}))
        if problems:
            raise CrossProblems(problems)
        return self
