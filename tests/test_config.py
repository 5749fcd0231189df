"""plate.yaml loading: defaults, precedence, path resolution and error reporting."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from pcim_cli.config import (
    NormalizeFixed,
    NormalizeNone,
    NormalizePercentile,
    RunConfig,
    load_config,
)
from pcim_cli.errors import ConfigError

MINIMAL = """
plate:
  images: images/
  channels: [DNA, PH3, Actin]
model:
  path: classifier.ts
"""


def write(tmp_path: Path, text: str, name: str = "P001.yaml") -> Path:
    path = tmp_path / "configs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line.strip() for line in str(exc.value).splitlines()[1:]]


def test_minimal_config_defaults_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(path, environ={})
    base = path.parent
    assert cfg.config_path == path and cfg.base_dir == base
    assert cfg.plate.name == "P001"
    assert cfg.plate.images == base / "images"
    assert cfg.plate.channels == {"DNA": "DNA", "PH3": "PH3", "Actin": "Actin"}
    assert list(cfg.plate.channels) == ["DNA", "PH3", "Actin"]
    assert cfg.plate.pattern == "{well}_s{field}_w{channel}.tif"
    assert cfg.plate.layout is None and cfg.plate.wells is None
    assert cfg.model.path == base / "classifier.ts"
    assert cfg.model.classes is None and cfg.model.input_size is None
    assert cfg.model.normalize == NormalizePercentile(low=1.0, high=99.8)
    explain = cfg.explain.model_dump()
    assert {k: explain[k] for k in ("method", "target", "steps", "lr", "per_channel", "seed")} == {
        "method": "pcim", "target": "predicted", "steps": 49, "lr": 0.3, "per_channel": False, "seed": 0}
    assert (cfg.explain.schedule, cfg.explain.init, cfg.explain.noise) == ("constant", "gradient", 0.02)
    assert cfg.compute.cluster == "local" and cfg.compute.workers == "auto"
    assert cfg.compute.device == "auto" and cfg.compute.batch_size == 16
    assert cfg.compute.slurm.walltime == "01:00:00" and cfg.compute.slurm.job_extra == []
    assert cfg.output.zarr == base / "out" / "P001.zarr"
    assert cfg.output.csv == base / "out" / "P001_pcim.csv"
    assert cfg.output.format == "0.5"


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "abs").mkdir()
    path = write(tmp_path, f"""
    plate:
      name: PLATE-7
      images: ../raw
      pattern: "{{well}}_s{{field}}_w{{channel}}*.tif"
      channels: {{DNA: w1, PH3: w2}}
      layout: layout.csv
      wells: [a1, B/3, C005]
    model:
      path: {tmp_path / "abs" / "m.pt2"}
      classes: [negative, mitotic]
      input_size: [128, 96]
      normalize: {{method: fixed, min: 0, max: 4095}}
    explain:
      method: integrated-gradients
      target: layout:moa
      steps: 50
      lr: 0.05
      per_channel: true
      seed: 3
    compute:
      cluster: slurm
      workers: 2
      device: cuda:1
      batch_size: 4
      slurm:
        queue: gpu
        walltime: 1:30:00
        cores: 8
        memory: 64GB
        gpus: 2
        jobs: 3
        job_extra: ["--constraint=a100"]
    output:
      zarr: /data/{{plate}}/maps.zarr
      csv: results/{{plate}}.csv
      format: 0.4
    """)
    cfg = load_config(path, environ={})
    base = path.parent
    assert cfg.plate.name == "PLATE-7"
    assert cfg.plate.images == base / ".." / "raw"
    assert cfg.plate.channels == {"DNA": "w1", "PH3": "w2"}
    assert cfg.plate.layout == base / "layout.csv"
    assert cfg.plate.wells == ["A01", "B03", "C05"]
    assert cfg.model.path == tmp_path / "abs" / "m.pt2"
    assert cfg.model.input_size == (128, 96)
    assert cfg.model.normalize == NormalizeFixed(min=0, max=4095)
    assert cfg.explain.method == "integrated-gradients" and cfg.explain.per_channel is True
    assert cfg.compute.workers == 2 and cfg.compute.device == "cuda:1"
    assert cfg.compute.slurm.walltime == "1:30:00"  # not YAML 1.1's sexagesimal 5400
    assert cfg.compute.slurm.job_extra == ["--constraint=a100"]
    assert cfg.output.zarr == Path("/data/PLATE-7/maps.zarr")
    assert cfg.output.csv == base / "results" / "PLATE-7.csv"
    assert cfg.output.format == "0.4"


def test_precedence_defaults_yaml_env_cli(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "explain:\n  steps: 10\n  lr: 0.5\n  seed: 1\n")
    environ = {"PCIM_EXPLAIN__STEPS": "20", "PCIM_EXPLAIN__LR": "0.25", "PCIM_COMPUTE__SLURM__QUEUE": "gpu",
               "PCIM_VERBOSE": "1", "HOME": "/root"}
    cfg = load_config(path, ["explain.steps=30", "plate.wells=[A01, b2]"], environ=environ)
    assert cfg.explain.steps == 30  # CLI beats env
    assert cfg.explain.lr == 0.25  # env beats YAML
    assert cfg.explain.seed == 1  # YAML beats default
    assert cfg.explain.per_channel is False  # default
    assert cfg.compute.slurm.queue == "gpu"  # nested env key
    assert cfg.plate.wells == ["A01", "B02"]  # YAML list in an override


def test_overrides_resolve_paths_and_plate_name(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["model.path=other.ts", "plate.name=P9", "plate.pattern={well}-{channel}.tif",
                             "model.normalize=none"], environ={})
    assert cfg.model.path == path.parent / "other.ts"
    assert cfg.output.zarr == path.parent / "out" / "P9.zarr"
    assert cfg.plate.pattern == "{well}-{channel}.tif"  # not valid YAML: kept as text
    assert cfg.model.normalize == NormalizeNone()


def test_dask_scheduler_address_fills_a_missing_address(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "compute:\n  cluster: address\n")
    cfg = load_config(path, environ={"DASK_SCHEDULER_ADDRESS": "tcp://head:8786"})
    assert cfg.compute.address == "tcp://head:8786"
    with pytest.raises(ConfigError, match="compute.address: required with compute.cluster: address"):
        load_config(path, environ={})
    explicit = load_config(path, ["compute.address=tcp://other:1"], environ={"DASK_SCHEDULER_ADDRESS": "x"})
    assert explicit.compute.address == "tcp://other:1"


def test_all_problems_reported_at_once_with_paths(tmp_path: Path) -> None:
    path = write(tmp_path, """
    plate:
      images: images/
      channels: [DNA, DNA]
      wells: [A01, Q99]
      colour: red
    model:
      path: m.ts
      input_size: [0, 64]
      normalize: {method: percentil}
    explain:
      stpes: 100
      method: gradcam
      lr: -1
    compute:
      workers: none
      device: gpu
      slurm: {walltime: soon}
    output:
      format: "0.6"
      zarr: out/{plat}.zarr
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["explain.seed=-2", "compute.batchsize=3"], environ={"PCIM_OUTPUT__CVS": "x.csv"})
    message = str(info.value)
    assert str(path) in message.splitlines()[0]
    got = problems(info)
    expected = [
        "plate.channels: channel 'DNA' is listed twice",
        "plate.colour: unknown key",
        "model.input_size[0]: input should be greater than 0 (got 0)",
        "model.normalize.method: 'percentil' is not allowed: use one of percentile, fixed, zscore, none "
        "(did you mean 'percentile'?)",
        "explain.stpes: unknown key (did you mean 'steps'?)",
        "explain.method: 'gradcam' is not allowed: use one of pcim, pcim-amortised, saliency, integrated-gradients, "
        "occlusion, rise",
        "explain.lr: input should be greater than 0 (got -1)",
        "explain.seed: input should be greater than or equal to 0 (got -2) [from --set explain.seed=-2]",
        "compute.workers: must be 'auto' or a positive whole number, got 'none'",
        "compute.device: 'gpu' is not a device: use auto, cpu, cuda or cuda:<index>",
        "compute.batchsize: unknown key (did you mean 'batch_size'?) [from --set compute.batchsize=3]",
        "compute.slurm.walltime: 'soon' is not a Slurm time limit",
        "output.cvs: unknown key (did you mean 'csv'?) [from environment variable PCIM_OUTPUT__CVS]",
        "output.zarr: unknown placeholder(s) {plat}; only {plate} is filled in",
        "output.format: '0.6' is not allowed: use one of 0.5, 0.4",
    ]
    for line in expected:
        assert any(g.startswith(line) for g in got), f"missing {line!r} in:\n{message}"
    assert any(g.startswith("plate.wells: well Q99") for g in got)
    assert message.count("\n") == len(got)
    assert f"({len(got)} problems)" in message.splitlines()[0]


def test_cross_section_problems(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  classes: [negative, mitotic]\nexplain:\n  target: mitotc\n")
    with pytest.raises(ConfigError, match=r"explain.target: 'mitotc' is not in model.classes .*did you mean "
                                          r"'mitotic'"):
        load_config(path, environ={})
    assert load_config(path, ["explain.target=mitotic"], environ={}).explain.target == "mitotic"
    with pytest.raises(ConfigError, match="reads the layout, but plate.layout is not set"):
        load_config(path, ["explain.target=layout:moa"], environ={})
    bare = write(tmp_path, MINIMAL, "bare.yaml")
    assert load_config(bare, ["explain.target=1"], environ={}).explain.target == "1"
    with pytest.raises(ConfigError, match="model.classes is not set"):
        load_config(bare, ["explain.target=mitotic"], environ={})


def test_required_keys_and_bad_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "plate:\n  name: x\n"), environ={})
    assert problems(info) == ["plate.images: required key missing", "plate.channels: required key missing",
                              "model: required key missing"]
    with pytest.raises(ConfigError, match="plate: must be a mapping of keys, got 'images'"):
        load_config(write(tmp_path, "plate: images\nmodel: {path: m.ts}\n"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})


def test_file_and_syntax_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        load_config(missing, environ={})
    bad = write(tmp_path, "plate:\n  images: [a\nmodel: x\n", "bad.yaml")
    with pytest.raises(ConfigError, match=rf"{bad}: YAML syntax error at line \d+, column \d+"):
        load_config(bad, environ={})
    dup = write(tmp_path, MINIMAL + "explain:\n  steps: 1\n  steps: 2\n", "dup.yaml")
    with pytest.raises(ConfigError, match=r"duplicate key 'steps'"):
        load_config(dup, environ={})


def test_bad_override_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["explain.steps", "plate.images.sub=1"], environ={"PCIM_EXPLIAN__STEPS": "3"})
    got = problems(info)
    assert "--set explain.steps: expected section.key=value, e.g. --set explain.steps=100" in got
    assert any(g.startswith("plate.images.sub: cannot set a key below plate.images") for g in got)
    assert ("explian: unknown key (did you mean 'explain'?) [from environment variable PCIM_EXPLIAN__STEPS]"
            in got)


@pytest.mark.parametrize(("value", "expected"), [
    ("none", NormalizeNone()),
    ("null", NormalizeNone()),
    ("percentile", NormalizePercentile()),
    ("{method: percentile, low: 0.5, high: 99}", NormalizePercentile(low=0.5, high=99)),
    ("{method: fixed, min: 100, max: 4000}", NormalizeFixed(min=100, max=4000)),
])
def test_normalize_union(tmp_path: Path, value: str, expected: object) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), [f"model.normalize={value}"], environ={})
    assert cfg.model.normalize == expected


@pytest.mark.parametrize(("value", "fragment"), [
    ("{method: percentile, low: 99, high: 1}", "model.normalize: low (99.0) must be below high (1.0)"),
    ("{method: fixed, min: 0}", "model.normalize.max: required key missing"),
    ("{method: none, low: 1}", "model.normalize.low: unknown key"),
    ("{low: 1}", "model.normalize.method: required key missing"),
])
def test_normalize_errors(tmp_path: Path, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, MINIMAL), [f"model.normalize={value}"], environ={})


def test_channel_mapping_forms(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), ["plate.channels={DNA: 1, PH3: 2}"], environ={})
    assert cfg.plate.channels == {"DNA": "1", "PH3": "2"}
    with pytest.raises(ConfigError, match="token.*1 used for more than one channel"):
        load_config(write(tmp_path, MINIMAL), ["plate.channels={DNA: 1, PH3: 1}"], environ={})
    with pytest.raises(ConfigError, match="plate.channels: list at least one channel"):
        load_config(write(tmp_path, MINIMAL), ["plate.channels=[]"], environ={})
    with pytest.raises(ConfigError, match="plate.pattern: unknown placeholder {site}"):
        load_config(write(tmp_path, MINIMAL), ["plate.pattern={well}_{site}.tif"], environ={})


def test_numbers_accepted_as_text(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  classes: [0, 1]\nexplain:\n  target: 1\n", "2024.yaml")
    cfg = load_config(path, ["plate.name=42", "compute.slurm.walltime=90"], environ={})
    assert cfg.model.classes == ["0", "1"] and cfg.explain.target == "1"
    assert cfg.plate.name == "42" and cfg.compute.slurm.walltime == "90"
    assert cfg.output.csv.name == "42_pcim.csv"


def test_dump_round_trip_keeps_resolved_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL), environ={})
    again = RunConfig.model_validate_json(cfg.model_dump_json())
    assert again.model_dump() == cfg.model_dump()
    assert again.config_path is None and again.plate.images == cfg.plate.images


def test_explain_section_is_open_for_new_keys() -> None:
    """The lead adds engine keys to ExplainConfig later: the section stays a flat model."""
    from pcim_cli.config import ExplainConfig

    fields = ExplainConfig.model_fields
    assert {"method", "target", "steps", "lr", "per_channel", "seed"} <= set(fields)
    assert ExplainConfig.model_config["extra"] == "forbid"


def test_scalars_are_the_text_written_and_numbers_are_decimal(tmp_path: Path) -> None:
    path = write(tmp_path, """
    plate:
      name: 0012345
      images: images/
      channels: {DNA: 01, PH3: 02}
    model:
      path: classifier.ts
      classes: [no, yes, on]
      input_size: &size [064, 064]
    explain:
      <<: {steps: 010, lr: 1e-3}
      per_channel: yes
    compute:
      workers: 2
      slurm: {walltime: 01:00:00, jobs: 003}
    """)
    cfg = load_config(path, environ={"PCIM_EXPLAIN__SEED": "007"})
    assert cfg.plate.name == "0012345" and cfg.plate.channels == {"DNA": "01", "PH3": "02"}
    assert cfg.model.classes == ["no", "yes", "on"] and cfg.model.input_size == (64, 64)
    assert cfg.explain.steps == 10 and cfg.explain.lr == 0.001 and cfg.explain.per_channel is True
    assert cfg.explain.seed == 7 and cfg.compute.workers == 2 and cfg.compute.slurm.jobs == 3
    assert cfg.compute.slurm.walltime == "01:00:00"
    again = load_config(path, ["plate.name=0012345", "model.classes=[off, 'true']"], environ={})
    assert again.plate.name == "0012345" and again.model.classes == ["off", "true"]
    with pytest.raises(ConfigError, match=r"explain.steps: input should be a valid integer.*\(got '0x10'\)"):
        load_config(path, ["explain.steps=0x10"], environ={})


def test_alias_bombs_and_deep_nesting_are_refused_with_a_short_message(tmp_path: Path) -> None:
    levels = ["  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"  {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = write(tmp_path, "plate:\n" + "\n".join(levels) + "\n  wells: *g\nmodel: {path: m.ts}\n", "bomb.yaml")
    with pytest.raises(ConfigError, match="expand this document to more than 100000 values") as info:
        load_config(bomb, environ={})
    assert len(str(info.value)) < 400
    deep = write(tmp_path, "plate: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    with pytest.raises(ConfigError, match="nested more than 32 levels deep"):
        load_config(deep, environ={})
    long_value = write(tmp_path, MINIMAL + "compute:\n  device: " + "x" * 100_000 + "\n", "long.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(long_value, environ={})
    assert "compute.device" in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize(("address", "ok"), [
    ("tcp://node12:8786", True), ("node12:8786", True), ("tls://10.0.0.1:8786", True), ("[::1]:8786", True),
    ("nonsense", False), ("tcp://node12", False), ("tcp://node12:99999", False), ("tcp://:8786", False),
])
def test_a_scheduler_address_is_host_and_port(tmp_path: Path, address: str, ok: bool) -> None:
    path = write(tmp_path, MINIMAL)
    sets = ["compute.cluster=address", f"compute.address={address}"]
    if ok:
        assert load_config(path, sets, environ={}).compute.address == address
    else:
        with pytest.raises(ConfigError, match="compute.address: .* is not a Dask scheduler address"):
            load_config(path, sets, environ={})


# --------------------------------------------------------------------------------------------------
# one declaration per setting (issue 23): the engine's options, `explain:`, the template, the environment


def test_explain_keys_are_the_engine_options_with_their_defaults_and_descriptions() -> None:
    from pcim_cli.config import ExplainConfig
    from pcim_cli.engine.options import PcimOptions

    engine = {f.name: f for f in dataclasses.fields(PcimOptions)}
    fields = ExplainConfig.model_fields
    assert set(engine) - {"intensity_channel"} <= set(fields)  # plate.yaml names the channel (auto | name)
    for name, f in engine.items():
        if name == "intensity_channel":
            continue
        assert fields[name].default == f.default and fields[name].description == f.metadata["description"], name
    defaults = ExplainConfig()
    assert all(getattr(defaults, k) == getattr(PcimOptions(), k) for k in engine if k != "intensity_channel")


def test_the_template_writes_every_key_at_its_default(tmp_path: Path) -> None:
    from pcim_cli.config import RunConfig
    from pcim_cli.config.template import FILL_IN, write_template
    from pcim_cli.config.yaml_reader import read_yaml

    template = write_template(tmp_path / "plate.yaml")
    written = read_yaml(template)
    for section, info in RunConfig.model_fields.items():  # every key of every section is in the template
        assert set(written[section]) == set(info.annotation.model_fields), section
    # and each holds its default: the template reads as the same config as a file with only the fill-ins
    sections: dict = {}
    for (section, key), value in FILL_IN.items():
        sections.setdefault(section, {})[key] = value
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text(yaml.safe_dump(sections))
    same_name = ["plate.name=P1"]
    assert load_config(template, same_name, environ={}).model_dump() == \
        load_config(minimal, same_name, environ={}).model_dump()


def test_engine_options_that_were_silently_dropped_are_real_keys(tmp_path: Path) -> None:
    """coarse, coarse_share, beta1 and beta2 were engine options plate.yaml could not set; they are keys
    now, reach the engine, and change the settings fingerprint (the defaults do not)."""
    from pcim_cli.run.inventory import engine_options, fingerprint

    path = write(tmp_path, MINIMAL)
    sets = ["explain.coarse=2", "explain.coarse_share=0.25", "explain.beta1=0.5", "explain.beta2=0.99"]
    opts = engine_options(load_config(path, sets, environ={}))
    assert (opts.coarse, opts.coarse_share, opts.beta1, opts.beta2) == (2, 0.25, 0.5, 0.99)
    plain = fingerprint(load_config(path, environ={}), "0" * 64)
    assert fingerprint(load_config(path, ["explain.coarse=0", "explain.beta1=0.9"], environ={}), "0" * 64) == plain
    for s in sets:
        assert fingerprint(load_config(path, [s], environ={}), "0" * 64) != plain, s
    with pytest.raises(ConfigError, match="explain.beta2: beta1 and beta2") as info:
        load_config(path, ["explain.beta2=1", "explain.coarse_share=1.5"], environ={})
    assert "explain.coarse_share" in str(info.value)


def test_environment_settings_have_one_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from pcim_cli.config.settings import GRACE_ENV, LOCK_STALE_ENV, read_settings

    assert read_settings({}).model_dump() == {"grace_seconds": 60.0, "lock_stale_s": 900.0}
    assert read_settings({GRACE_ENV: "5", LOCK_STALE_ENV: " ", "PCIM_OTHER": "x"}).grace_seconds == 5.0
    with pytest.raises(ConfigError) as info:  # every bad value in one message, each with an example
        read_settings({GRACE_ENV: "-1", LOCK_STALE_ENV: "soon"})
    assert f"{GRACE_ENV}='-1'" in str(info.value) and f"{LOCK_STALE_ENV}='soon'" in str(info.value)
    assert f"e.g. {LOCK_STALE_ENV}=900" in str(info.value)


def test_reading_plate_yaml_and_starting_the_cli_import_no_torch(tmp_path: Path) -> None:
    """`pcim schema`, a configuration error and `--help` come back without loading torch (import-linter
    checks config/ statically; this checks what a command really imports)."""
    import subprocess
    import sys

    path = write(tmp_path, MINIMAL)
    code = ("import sys; from pcim_cli.cli import app; from pcim_cli.config import load_config; "
            f"load_config({str(path)!r}); print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    for command in ("validate", "explain", "evaluate --masks m.tif", "train-explainer --out e.pt"):
        argv = ["pcim", *command.split()[:1], str(path), *command.split()[1:], "--set", "compute.batch_size=0"]
        code = (f"import sys; sys.argv = {argv!r}; from pcim_cli.cli.app import main\n"
                "try:\n    main()\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.split()[-2:] == ["78", "False"], (command, out.stdout, out.stderr[-2000:])
