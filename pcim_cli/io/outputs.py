"""Every path a command writes, known before it starts, and what pcim may replace there.

The output-path rule (README, "What pcim guarantees"), checked by :func:`check` before anything is
read, fitted or written:

- an output file may only be absent, empty (0 bytes), or a file pcim wrote itself, recognised by its
  content (:data:`RECOGNISERS`: the header of pcim's CSVs, the record inside pcim's explainer archive,
  the ``format`` of its sidecar, the marker of its checkpoint, the ``Software`` text of its PNGs, the
  title of its report). Anything else — a user's table, a device, a folder — is refused (exit 65,
  naming the path and the key that asked for it); ``--force`` does not change that;
- no output is an input of the plate: plate.yaml (or the screen file), the layout, the model, the
  explainer and its sidecar, the scheduler file, an image file or a label image. Paths are compared
  after resolving symlinks and ``..`` (exit 65);
- two outputs on one path, or one output inside a folder another output writes (the store), are a
  configuration error naming both keys (exit 78), also across the plates of a screen;
- the folder of every output must be writable: the nearest existing folder is probed with a temporary
  file, created and removed at once (a check of permission bits says yes to root, even in ``/proc``)
  (exit 65).

The store (``output.zarr``) is a folder whose ownership io/ownership.py decides; here it takes part in
the collision and input checks only.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pcim_cli.errors import ConfigError, OutputError, os_reason

#: the first columns of every CSV pcim writes (summary, screen and object tables)
CSV_IDS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
#: columns that make a CSV pcim's summary (per plate, or a screen's)
SUMMARY_MARKS = ("PCIM_Target", "PCIM_Status", "PCIM_ZarrPath")
#: the columns after CSV_IDS in pcim's per-object tables (io/object_tables.py OBJECT_ID_COLUMNS)
OBJECT_MARKS = ("ObjectNumber", "Location_Center_X", "Location_Center_Y", "AreaShape_Area")
#: the marker inside an explainer's checkpoint (run/train.py writes it)
CHECKPOINT_FORMAT = "pcim-explainer-checkpoint/1"
#: the text key and value prefix of the PNGs `pcim render` writes
PNG_SOFTWARE = ("Software", "pcim")
REPORT_TITLE = "<title>pcim report:"
#: in the head of every report whose pictures carry PNG_SOFTWARE (a report without it is older: its
#: pictures are recognised by being listed in it)
REPORT_MARK = '<meta name="pcim-pictures" content="marked">'



@dataclass(frozen=True)
class Output:
    """One path a command will write: which key asked for it, what kind of file it is, how to change it."""

    key: str  # e.g. output.csv, plate.objects.Nuclei, --out
    path: Path
    kind: str  # csv | store | explainer | sidecar | checkpoint | png | html
    plate: str = ""  # the plate whose output it is (screens)
    fix: str = ""  # how to choose another path, for messages

    @property
    def label(self) -> str:
        return f"{self.key} of plate {self.plate}" if self.plate else self.key

    @property
    def how(self) -> str:
        return self.fix or f"set {self.key} to another path"


@dataclass
class Inputs:
    """What a command reads: files by resolved path, and folders whose files matching a pattern are inputs
    (a plate's images and label images)."""

    files: dict[Path, str] = field(default_factory=dict)  # resolved path -> what it is
    patterns: list[tuple[Path, re.Pattern[str], str]] = field(default_factory=list)  # folder, rel. path regex
    folders: dict[Path, str] = field(default_factory=dict)  # resolved input folders -> what they are

    def add_file(self, path: Path | None, what: str) -> None:
        if path is not None:
            self.files.setdefault(_real(path), what)

    def add_pattern(self, folder: Path, regex: re.Pattern[str], what: str, folder_what: str) -> None:
        for where in dict.fromkeys((_real(folder), Path(os.path.abspath(Path(folder).expanduser())))):
            self.patterns.append((where, regex, what))
        self.folders.setdefault(_real(folder), folder_what)

    def update(self, other: Inputs) -> None:
        for path, what in other.files.items():
            self.files.setdefault(path, what)
        self.patterns += other.patterns
        for path, what in other.folders.items():
            self.folders.setdefault(path, what)

    def what(self, path: Path) -> str | None:
        """What input `path` is (None: no input): by its resolved path, and for image and label files also by
        the path as written (an image file may be a link into the acquisition's storage)."""
        real = _real(path)
        if real in self.files:
            return self.files[real]
        written = Path(os.path.abspath(Path(path).expanduser()))
        for folder, regex, what in self.patterns:
            for candidate in (real, written):
                if (_inside(candidate, folder) and candidate != folder
                        and regex.fullmatch(candidate.relative_to(folder).as_posix())):
                    return what
        return None

    def folder(self, path: Path) -> str | None:
        """The input folder `path` is (None: none)."""
        return self.folders.get(_real(path))


def _real(path: Path) -> Path:
    """The absolute path with symlinks and `..` resolved (also where the path does not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# --------------------------------------------------------------------------------------------------
# what a plate run reads and writes


def plate_outputs(cfg) -> list[Output]:
    """Every path `pcim explain` writes for this plate: its store, its CSV, its object tables."""
    from pcim_cli.io.object_tables import csv_path

    name = cfg.plate.name
    csv_fix = "set output.csv to another path"
    outs = [Output("output.zarr", Path(cfg.output.zarr), "store", fix="set output.zarr to another path"),
            Output("output.csv", Path(cfg.output.csv), "csv", fix=csv_fix)]
    for kind in cfg.plate.objects or {}:
        outs.append(Output(f"plate.objects.{kind}", csv_path(Path(cfg.output.csv), name, kind), "csv",
                           fix=f"the {kind} table is written beside output.csv as {name}_pcim_{kind}.csv: set "
                               "output.csv to another file or folder"))
    return outs


def explainer_outputs(out: Path) -> list[Output]:
    """What `pcim train-explainer --out OUT` writes: the explainer, its sidecar and its checkpoint."""
    from pcim_cli.io.explainer import sidecar_path

    out = Path(out)
    fix = "choose another --out"
    return [Output("--out", out, "explainer", fix=fix),
            Output("--out's sidecar", sidecar_path(out), "sidecar", fix=fix),
            Output("--out's checkpoint", out.with_name(out.name + ".ckpt"), "checkpoint", fix=fix)]


def check_training(out: Path, configs: Sequence) -> None:
    """`pcim train-explainer`: --out, its sidecar and checkpoint may only replace pcim's explainer files,
    never an input of the plates it trains on (their own explain.explainer aside: retrained in place)."""
    inputs = Inputs()
    for cfg in configs:
        inputs.update(plate_inputs(cfg, explainer=False))
    check(explainer_outputs(out), inputs)


def plate_inputs(cfg, explainer: bool = True) -> Inputs:
    """Every file `pcim explain` reads for this plate (without listing the image folder); `explainer`:
    with explain.explainer and its sidecar."""
    from pcim_cli.io import ome_zarr_plate
    from pcim_cli.io.labels import split_pattern
    from pcim_cli.io.patterns import compile_pattern

    found = Inputs()
    found.add_file(cfg.config_path, "the plate's configuration")
    found.add_file(cfg.plate.layout, "the plate's layout (plate.layout)")
    found.add_file(cfg.model.path, "the plate's model (model.path)")
    if explainer and cfg.explain.explainer is not None:
        from pcim_cli.io.explainer import sidecar_path

        found.add_file(cfg.explain.explainer, "the plate's explainer (explain.explainer)")
        found.add_file(sidecar_path(cfg.explain.explainer), "the sidecar of the plate's explainer")
    found.add_file(cfg.compute.scheduler_file, "the scheduler file (compute.scheduler_file)")
    if ome_zarr_plate.is_zarr(Path(cfg.plate.images)):  # an OME-Zarr plate: the whole store is input
        found.add_file(Path(cfg.plate.images), "the plate's OME-Zarr store (plate.images)")
        found.add_pattern(Path(cfg.plate.images), re.compile(".*", re.DOTALL),
                          "a file of the plate's OME-Zarr store (plate.images)", "the plate's OME-Zarr store")
    else:
        with contextlib.suppress(ValueError):  # a bad pattern is reported by discovery, with its fix
            found.add_pattern(Path(cfg.plate.images), compile_pattern(cfg.plate.pattern),
                              "an image file of the plate (plate.images)", "the plate's image folder (plate.images)")
    model = Path(cfg.model.path)
    if model.suffix.lower() in (".yaml", ".yml") or model.is_dir():  # a bioimage.io package's folder
        folder = model if model.is_dir() else model.parent
        found.add_pattern(folder, re.compile(".*", re.DOTALL), "a file of the model package (model.path)",
                          "the model package's folder (model.path)")
    for kind, pattern in (cfg.plate.objects or {}).items():
        root, rest = split_pattern(pattern)
        with contextlib.suppress(ValueError):
            found.add_pattern(root, compile_pattern(rest), f"a label image of the plate (plate.objects.{kind})",
                              f"the plate's label folder (plate.objects.{kind})")
    return found


def check_plate(cfg) -> None:
    """`pcim explain` of one plate: its outputs against each other, its inputs, pcim's ownership and the
    file system. Raises ConfigError (78) or OutputError (65); reads only."""
    check(plate_outputs(cfg), plate_inputs(cfg))


def check_screen(configs: Sequence, screen_csv: Path | None, screen_files: Iterable[Path] = ()) -> None:
    """A screen: every plate's outputs and output.screen_csv against each other and against every plate's
    inputs (and the screen file), before any plate runs."""
    outs: list[Output] = []
    inputs = Inputs()
    for path in screen_files:
        inputs.add_file(Path(path), "the screen file")
    for cfg in configs:
        outs += [Output(o.key, o.path, o.kind, cfg.plate.name, o.fix) for o in plate_outputs(cfg)]
        inputs.update(plate_inputs(cfg))
    if screen_csv is not None:
        outs.append(Output("output.screen_csv", Path(screen_csv), "csv", fix="set output.screen_csv to another path"))
    check(outs, inputs)


def check(outputs: Sequence[Output], inputs: Inputs | None = None) -> None:
    """The whole rule for a list of outputs (see the module docstring); first collisions (78), then each
    output's inputs, ownership and folder (65)."""
    inputs = inputs or Inputs()
    collisions(outputs)
    for out in outputs:
        what = inputs.what(out.path)
        if what is not None:
            raise OutputError(f"{out.label} {out.path} is {what}: pcim never writes over an input; {out.how}")
        if out.kind == "store":
            inner = next((p for p in inputs.files if _inside(p, _real(out.path)) and p != _real(out.path)), None)
            if inner is not None:
                raise OutputError(f"{out.label} {out.path} holds {inputs.files[inner]} ({inner}): pcim never "
                                  f"writes a store around its inputs; {out.how}")
        else:  # a store's ownership is io/ownership.py's
            check_replaceable(out)
        check_folder(out)


def collisions(outputs: Sequence[Output]) -> None:
    """Two outputs on one path, or a file output inside a store folder: ConfigError naming both keys."""
    seen: dict[Path, Output] = {}
    for out in outputs:
        real = _real(out.path)
        if real in seen:
            first = seen[real]
            raise ConfigError(f"{first.label} and {out.label} are one file, {out.path}: every output needs its "
                              f"own path; {out.how}")
        seen[real] = out
    stores = [(o, _real(o.path)) for o in outputs if o.kind == "store"]
    for out in outputs:
        real = _real(out.path)
        for store, folder in stores:
            if store is not out and real != folder and _inside(real, folder):
                raise ConfigError(f"{out.label} {out.path} is inside {store.label} {store.path}: the store holds "
                                  f"only pcim's maps; {out.how}")


def check_replaceable(out: Output) -> None:
    """An output file that exists must be empty or pcim's own (recognised by its content): else OutputError."""
    path = Path(out.path)
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise OutputError(f"{out.label} {path} is a folder: pcim writes a file there only where none is; "
                          f"{out.how}")
    if not path.is_file():
        raise OutputError(f"{out.label} {path} exists and is not a regular file (a device, pipe or broken "
                          f"link): pcim replaces only files it wrote; {out.how}")
    if path.stat().st_size == 0:
        return  # nothing to lose (e.g. a file made by mktemp for pcim to fill)
    recognise = RECOGNISERS[out.kind]
    if not recognise(path):
        raise OutputError(f"{out.label} {path} exists and is not a file pcim wrote ({DESCRIPTIONS[out.kind]}): "
                          f"pcim replaces only its own outputs, never another file; {out.how}, or move that "
                          "file away")


def check_folder(out: Output) -> None:
    """The folder `out` goes into can be written: the nearest existing folder is probed with a temporary
    file (a file in the way is named). A store's own folder is probed by its run lock, written first."""
    path = Path(out.path).expanduser().absolute()
    folder = path.parent  # a store's own folder is probed by its run lock, written first
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {out.label} {path}: {folder} is a file, not a folder; {out.how}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pcim-probe-", dir=folder)
    except OSError as exc:
        reason = os_reason(exc) if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else exc.strerror
        raise OutputError(f"cannot write {out.label} {path}: no file can be created in {folder} ({reason}); "
                          f"{out.how} in a writable folder") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_render(out_dir: Path, store: Path, wells: Iterable[str], cfg=None) -> None:
    """`pcim render --out DIR`: DIR is no input folder (the store, and with --plate-yaml the plate's image
    and label folders, or any folder holding TIFF images), and report.html, montage.png, shortcuts.png and the chosen
    wells' PNGs there are absent or pcim's own. Raises OutputError (65); reads only."""
    out_dir = Path(out_dir)
    fix = "pass another --out (a new folder)"
    inputs = plate_inputs(cfg) if cfg is not None else Inputs()
    what = inputs.folder(out_dir) or ("the store it draws" if _inside(_real(out_dir), _real(store)) else None)
    if what is not None:
        raise OutputError(f"--out {out_dir} is {what}: pcim render never writes into an input folder; {fix}")
    if out_dir.is_dir() and any(p.suffix.lower() in (".tif", ".tiff") for p in out_dir.iterdir()):
        raise OutputError(f"--out {out_dir} holds TIFF images (a raw image folder?): pcim render never writes into "
                          f"an input folder; {fix}")
    outs = [Output("--out", out_dir / "report.html", "html", fix=fix),
            Output("--out", out_dir / "montage.png", "png", fix=fix),
            Output("--out", out_dir / "shortcuts.png", "png", fix=fix)]
    folder = out_dir / "wells"
    if folder.is_dir():
        names = {f"{w}_s" for w in wells}
        outs += [Output("--out", p, "png", fix=fix) for p in sorted(folder.iterdir())
                 if p.suffix == ".png" and any(p.name.startswith(n) for n in names)]
    check(outs, inputs)


def png_info():
    """The text every PNG of `pcim render` carries, so a later render recognises it as its own."""
    from PIL.PngImagePlugin import PngInfo

    from pcim_cli import __version__

    info = PngInfo()
    info.add_text(PNG_SOFTWARE[0], f"{PNG_SOFTWARE[1]} {__version__}")
    return info


# --------------------------------------------------------------------------------------------------
# recognising pcim's own files by their content


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV file ([] when it is not text)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16)
        line = head.decode("utf-8").splitlines()[0] if head else ""
        return next(csv.reader(io.StringIO(line)), [])
    except (OSError, UnicodeDecodeError, csv.Error, IndexError):
        return []


def is_pcim_csv(path: Path) -> bool:
    """A summary, screen or object CSV as pcim writes them (its header)."""
    header = csv_header(path)
    if tuple(header[:3]) != CSV_IDS:
        return False
    return set(SUMMARY_MARKS) <= set(header) or is_object_header(header)


def is_object_header(header: Sequence[str]) -> bool:
    return tuple(header[:3]) == CSV_IDS and tuple(header[3:7]) == OBJECT_MARKS


def is_pcim_explainer(path: Path) -> bool:
    """A TorchScript archive holding pcim's explainer record (io/explainer.py)."""
    from pcim_cli.io.explainer import META_NAME

    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(f"/extra/{META_NAME}") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def is_pcim_sidecar(path: Path) -> bool:
    """The JSON sidecar of an explainer (its `format`)."""
    from pcim_cli.io.explainer import FORMAT

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def is_pcim_checkpoint(path: Path) -> bool:
    """A training checkpoint: a torch.save archive whose pickle holds pcim's checkpoint format (or, written
    before it did, exactly its keys). The pickle's opcodes are only listed, never run."""
    import pickletools

    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            data = archive.read(name) if name else b""
        strings = {arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
    return CHECKPOINT_FORMAT in strings or {"key", "trainer", "extra", "done", "val_before"} <= strings


def is_pcim_png(path: Path) -> bool:
    """A PNG `pcim render` wrote (its Software text), or one listed by pcim's report beside it."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}) or {})
    except Exception:  # noqa: BLE001 - not an image PIL can open: not ours
        return False
    key, prefix = PNG_SOFTWARE
    if str(text.get(key, "")).startswith(prefix):
        return True
    for folder in (path.parent, path.parent.parent):  # a report from before the PNGs carried the text
        report = folder / "report.html"
        if is_pcim_report(report):
            rel = path.relative_to(folder).as_posix()
            with contextlib.suppress(OSError):
                text = report.read_text(encoding="utf-8", errors="replace")
                if REPORT_MARK not in text and f'src="{rel}"' in text:
                    return True
    return False


def is_pcim_report(path: Path) -> bool:
    """report.html as `pcim render` writes it (its title)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return REPORT_TITLE in head


RECOGNISERS: dict[str, Callable[[Path], bool]] = {
    "csv": is_pcim_csv, "explainer": is_pcim_explainer, "sidecar": is_pcim_sidecar,
    "checkpoint": is_pcim_checkpoint, "png": is_pcim_png, "html": is_pcim_report,
}
DESCRIPTIONS = {
    "csv": "its first line is not the header of a pcim CSV",
    "explainer": "it is no explainer written by pcim train-explainer",
    "sidecar": "it is no explainer record written by pcim train-explainer",
    "checkpoint": "it is no checkpoint written by pcim train-explainer",
    "png": "it is no picture written by pcim render",
    "html": "it is no report written by pcim render",
}


# --------------------------------------------------------------------------------------------------
# files pcim wrote that no longer describe anything


def stale_object_csvs(csv: Path, plate: str, keep: Iterable[Path]) -> list[Path]:
    """`{plate}_pcim_{Object}.csv` files beside output.csv that pcim wrote (their header says so) for an
    object kind the plate no longer lists (not in `keep`)."""
    import glob

    keep_real = {_real(p) for p in keep}
    folder = Path(csv).parent
    out = []
    for name in sorted(glob.glob(glob.escape(f"{plate}_pcim_") + "*.csv", root_dir=folder)):
        path = folder / name
        if _real(path) in keep_real or not path.is_file():
            continue
        if is_object_header(csv_header(path)):
            out.append(path)
    return out
